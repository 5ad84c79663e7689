"""Prometheus metrics of a publisher and a puller, registered in the engine's own registry under the
engine's prefix (``kvrelay_engine`` for the reference engine).  Failure labels are `FailureCode` values.

Owns: metric definitions for transfers.  Must not touch: anything it measures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from kvrelay.connector.breaker import CircuitBreaker

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class TransferMetrics:
    def __init__(self, registry: CollectorRegistry, prefix: str) -> None:
        r, p = registry, prefix
        self.publish_chunks = Counter(f"{p}_published_chunks", "Chunks published", registry=r)
        self.publish_bytes = Counter(f"{p}_published_bytes", "Bytes published", registry=r)
        self.publish_lag = Histogram(f"{p}_publish_lag_seconds", "Forward end to last layer committed",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.publish_errors = Counter(f"{p}_publish_errors", "Publish failures by FailureCode", ["reason"],
                                      registry=r)
        self.pulls = Counter(f"{p}_pulls", "Pulls by result (ok, recompute, fail) and FailureCode",
                             ["result", "reason"], registry=r)
        self.pull_bytes = Counter(f"{p}_pulled_bytes", "Bytes pulled", registry=r)
        self.pull_time = Histogram(f"{p}_pull_seconds", "Whole-request pull time", buckets=LATENCY_BUCKETS,
                                   registry=r)
        self.pull_skipped_tokens = Counter(f"{p}_pull_skipped_tokens",
                                           "Prompt tokens not pulled because this engine held their prefix",
                                           registry=r)
        self.breaker_open = Gauge(f"{p}_store_breaker_open", "1 while calls to the store are skipped after a "
                                  "failure (its circuit breaker is open)", registry=r)
        self.breaker_skipped = Counter(f"{p}_store_breaker_skipped", "Calls skipped while the store's breaker was "
                                       "open", registry=r)

    def watch(self, breaker: "CircuitBreaker") -> None:
        """Report ``breaker``'s state and skipped calls (read at scrape time)."""
        from kvrelay.connector.breaker import BreakerState
        self.breaker_open.set_function(lambda: float(breaker.state is not BreakerState.CLOSED))
        breaker.on_skip = self.breaker_skipped.inc
