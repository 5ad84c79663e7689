"""Prometheus metrics of one engine (its own registry, so several engines can share a process in tests).

Owns: metric definitions.  Must not touch: anything it measures.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvrelay.security.metrics import register as register_auth_metrics

from kvrelay.connector.metrics import LATENCY_BUCKETS as _LAT, TransferMetrics


class EngineMetrics:
    def __init__(self, role: str) -> None:
        r = self.registry = CollectorRegistry()
        register_auth_metrics(r)  # kvrelay_auth_refused_total (kvrelay.security)
        self.role = role
        self.requests = Counter("kvrelay_engine_requests", "Finished requests by outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter("kvrelay_engine_prompt_tokens", "Prompt tokens received", registry=r)
        self.computed_tokens = Counter("kvrelay_engine_prefill_computed_tokens", "Prompt tokens computed here",
                                       registry=r)
        self.generated_tokens = Counter("kvrelay_engine_generation_tokens", "Tokens generated", registry=r)
        self.prefix_hit_tokens = Counter("kvrelay_engine_prefix_cache_hit_tokens",
                                         "Prompt tokens served by this engine's prefix cache", registry=r)
        self.prefix_loaded_tokens = Counter("kvrelay_engine_prefix_loaded_tokens",
                                            "Prompt tokens loaded from a store on a router's hint, by store "
                                            "(own: this host's; other: another host's)", ["store"], registry=r)
        self.ttft = Histogram("kvrelay_engine_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_LAT, registry=r)
        self.step_time = Histogram("kvrelay_engine_step_seconds", "Engine step time", ["kind"], buckets=_LAT,
                                   registry=r)
        self.running = Gauge("kvrelay_engine_running", "Sequences running", registry=r)
        self.waiting = Gauge("kvrelay_engine_waiting", "Sequences waiting", registry=r)
        self.free_blocks = Gauge("kvrelay_engine_free_blocks", "Free KV cache blocks", registry=r)
        self.preemptions = Counter("kvrelay_engine_preemptions", "Sequences preempted", registry=r)
        self.transfer = TransferMetrics(r, "kvrelay_engine")  # P/D: kvrelay.connector's publisher and puller

    def render(self) -> bytes:
        return generate_latest(self.registry)
