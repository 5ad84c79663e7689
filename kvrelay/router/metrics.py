"""The router's Prometheus metrics.

Owns: the counters the legs report to, and a collector that reads every breaker (workers' and the
store's) at scrape time.  Must not touch: routing decisions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvrelay.security.metrics import register as register_auth_metrics
from kvrelay.router.breaker import BreakerState
from kvrelay.router.policy import Policy
from kvrelay.router.pool import Pool
from kvrelay.router.store import StoreWatch


class RouterMetrics:
    def __init__(self, pools: Sequence[Pool], store: StoreWatch | None, policy: Policy | None = None,
                 stores: Sequence[StoreWatch] = ()) -> None:
        """``stores``: with a store on every host, each store's watch (its breaker is shown as a store's)."""
        self.registry = r = CollectorRegistry()
        register_auth_metrics(r)  # kvrelay_auth_refused_total (kvrelay.security)
        self.requests = Counter("kvrelay_router_requests", "Requests by outcome", ["outcome"], registry=r)
        self.routes = Counter("kvrelay_router_routes", "Requests by route: pd (both legs), decode_only_no_prefill "
                              "(no prefill worker in service), decode_only_store_down (the store's breaker open), "
                              "short_prompt (below --decode-only-below: decode alone), decode_holds_prefix (a "
                              "decode worker holds --decode-only-hit of it: decode alone), store_holds_prompt "
                              "(no prefill leg: the decode pulls it)", ["route"], registry=r)
        self.retries = Counter("kvrelay_router_retries", "Leg attempts after a failed attempt", ["role"], registry=r)
        self.prefill_latency = Histogram("kvrelay_router_prefill_seconds", "Prefill legs answered by a worker "
                                         "(cancelled and failed attempts are not counted)", registry=r)
        self.prefill_drained = Counter("kvrelay_router_prefill_drained", "Prefill legs still running when their "
                                       "decode was answered, by how they ended: finished (their connection kept) or "
                                       "cancelled (after --prefill-drain seconds)", ["outcome"], registry=r)
        r.register(_BreakerCollector(pools, store, stores))
        if policy is not None:
            r.register(_PolicyCollector(policy))


class _PolicyCollector(Collector):
    """The conditional-disaggregation thresholds, and the size of the KV index (blocks per source)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def collect(self) -> Iterator[Metric]:
        d = self.policy.disagg
        yield GaugeMetricFamily("kvrelay_router_decode_only_below_tokens", "Prompts shorter than this go to a "
                                "decode worker alone (0: off)", value=d.min_prefill_tokens)
        yield GaugeMetricFamily("kvrelay_router_decode_only_hit", "A prompt a decode worker holds for this "
                                "fraction goes to it alone (above 1: off)", value=d.decode_hit)
        if self.policy.index is not None:
            blocks = GaugeMetricFamily("kvrelay_router_index_blocks", "Blocks the router's KV index knows a source "
                                       "(worker or store) holds", labels=["source"])
            stats = self.policy.index.stats()
            for key, n in stats.items():
                if key.startswith("blocks_"):
                    blocks.add_metric([key[len("blocks_"):]], n)
            yield blocks
            yield CounterMetricFamily("kvrelay_router_index_events", "KV events applied to the index",
                                      value=stats["events"])


class _BreakerCollector(Collector):
    def __init__(self, pools: Sequence[Pool], store: StoreWatch | None, stores: Sequence[StoreWatch] = ()) -> None:
        self.pools, self.store, self.stores = pools, store, stores  # stores: a store on every host's

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily("kvrelay_router_breaker_open", "1 while the breaker of a worker (or of the store) "
                                  "is open: it gets no requests", labels=["role", "worker"])
        opened = CounterMetricFamily("kvrelay_router_breaker_opened", "Times the breaker opened",
                                     labels=["role", "worker"])
        for pool in self.pools:
            for w in pool.workers:
                state.add_metric([pool.role, w.url], float(w.breaker.state is BreakerState.OPEN))
                opened.add_metric([pool.role, w.url], w.breaker.opened)
        for watch in ([self.store] if self.store is not None else []) + list(self.stores):
            state.add_metric(["store", watch.address], float(not watch.up))
            opened.add_metric(["store", watch.address], watch.breaker.opened)
        yield state
        yield opened
        if self.store is not None:
            yield GaugeMetricFamily("kvrelay_router_store_up", "1 while the store answers its pings (0: requests "
                                    "go to a decode worker alone)", value=float(self.store.up))
