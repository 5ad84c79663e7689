"""kvrelay's counters in vLLM: `KVRelayStats` travels from the scheduler and the workers to vLLM's
logger (``KV Transfer metrics: ...``) and `KVRelayPromMetrics` adds them to vLLM's ``/metrics`` as
``kvrelay:*`` counters (prefix hits and misses in tokens, bytes pulled and published, loads by result).

Owns: the counter names and their aggregation.  Must not touch: what is counted.
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
from vllm.v1.metrics.utils import create_metric_per_engine

# name -> help; every value is a count since the last report (summed across workers: with tensor parallelism every
# rank counts the bytes it moved and its failures, the first rank alone counts requests and tokens)
COUNTERS = {
    "lookup_hit_tokens": "Prompt tokens found in the kvrelay store by prefix lookups",
    "lookup_miss_tokens": "Prompt tokens not found in the kvrelay store by prefix lookups",
    "loads_ok": "Requests whose KV was loaded from the kvrelay store",
    "loads_failed": "Requests whose load from the kvrelay store failed (vLLM recomputes or fails them)",
    "loaded_tokens": "Prompt tokens loaded from the kvrelay store",
    "pulled_bytes": "Bytes pulled from the kvrelay store",
    "published_requests": "Requests whose prompt KV was published to the kvrelay store",
    "publish_failures": "Requests whose publish failed or was refused (the store full or down)",
    "published_bytes": "Bytes published to the kvrelay store",
    "store_skipped": "Store calls skipped while its circuit breaker was open",
    "params_refused": "Requests whose kv_transfer_params were ignored: with keys on, not signed by the router",
}


class KVRelayStats(KVConnectorStats):
    def __post_init__(self) -> None:
        for key in COUNTERS:
            self.data.setdefault(key, 0)

    def add(self, key: str, value: int | float = 1) -> None:
        self.data[key] = self.data.get(key, 0) + value

    def reset(self) -> None:
        self.data = {key: 0 for key in COUNTERS}

    def aggregate(self, other: KVConnectorStats) -> "KVRelayStats":
        for key, value in other.data.items():
            self.data[key] = self.data.get(key, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        return {key: self.data.get(key, 0) for key in COUNTERS}

    def is_empty(self) -> bool:
        return not any(self.data.get(key, 0) for key in COUNTERS)


class KVRelayPromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config: Any, metric_types: dict, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.counters: dict[str, dict[int, Any]] = {
            key: create_metric_per_engine(self._counter_cls(name=f"kvrelay:{key}", documentation=doc,
                                                             labelnames=labelnames), per_engine_labelvalues)
            for key, doc in COUNTERS.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, value in transfer_stats_data.items():
            if key in self.counters and value:
                self.counters[key][engine_idx].inc(value)
