"""The router's Prometheus metrics.

Owns: the counters the legs report to, and a collector that reads every breaker (workers' and the
store's) at scrape time.  Must not touch: routing decisions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvrelay.router.breaker import BreakerState
from kvrelay.router.pool import Pool
from kvrelay.router.store import StoreWatch


class RouterMetrics:
    def __init__(self, pools: Sequence[Pool], store: StoreWatch | None) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("kvrelay_router_requests", "Requests by outcome", ["outcome"], registry=r)
        self.routes = Counter("kvrelay_router_routes", "Requests by route: pd (both legs), decode_only_no_prefill "
                              "(no prefill worker in service), decode_only_store_down (the store's breaker open)",
                              ["route"], registry=r)
        self.retries = Counter("kvrelay_router_retries", "Leg attempts after a failed attempt", ["role"], registry=r)
        self.prefill_latency = Histogram("kvrelay_router_prefill_seconds", "Prefill legs answered by a worker "
                                         "(cancelled and failed attempts are not counted)", registry=r)
        self.prefill_drained = Counter("kvrelay_router_prefill_drained", "Prefill legs still running when their "
                                       "decode was answered, by how they ended: finished (their connection kept) or "
                                       "cancelled (after --prefill-drain seconds)", ["outcome"], registry=r)
        r.register(_BreakerCollector(pools, store))


class _BreakerCollector(Collector):
    def __init__(self, pools: Sequence[Pool], store: StoreWatch | None) -> None:
        self.pools, self.store = pools, store

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily("kvrelay_router_breaker_open", "1 while the breaker of a worker (or of the store) "
                                  "is open: it gets no requests", labels=["role", "worker"])
        opened = CounterMetricFamily("kvrelay_router_breaker_opened", "Times the breaker opened",
                                     labels=["role", "worker"])
        for pool in self.pools:
            for w in pool.workers:
                state.add_metric([pool.role, w.url], float(w.breaker.state is BreakerState.OPEN))
                opened.add_metric([pool.role, w.url], w.breaker.opened)
        if self.store is not None:
            state.add_metric(["store", self.store.address], float(not self.store.up))
            opened.add_metric(["store", self.store.address], self.store.breaker.opened)
        yield state
        yield opened
        if self.store is not None:
            yield GaugeMetricFamily("kvrelay_router_store_up", "1 while the store answers its pings (0: requests "
                                    "go to a decode worker alone)", value=float(self.store.up))
