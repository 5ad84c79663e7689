"""Prometheus metrics of one engine (its own registry, so several engines can share a process in tests).

Owns: metric definitions.  Must not touch: anything it measures.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LAT = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class EngineMetrics:
    def __init__(self, role: str) -> None:
        r = self.registry = CollectorRegistry()
        self.role = role
        self.requests = Counter("kvrelay_engine_requests", "Finished requests by outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter("kvrelay_engine_prompt_tokens", "Prompt tokens received", registry=r)
        self.computed_tokens = Counter("kvrelay_engine_prefill_computed_tokens", "Prompt tokens computed here",
                                       registry=r)
        self.generated_tokens = Counter("kvrelay_engine_generation_tokens", "Tokens generated", registry=r)
        self.prefix_hit_tokens = Counter("kvrelay_engine_prefix_cache_hit_tokens",
                                         "Prompt tokens served by this engine's prefix cache", registry=r)
        self.ttft = Histogram("kvrelay_engine_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_LAT, registry=r)
        self.step_time = Histogram("kvrelay_engine_step_seconds", "Engine step time", ["kind"], buckets=_LAT,
                                   registry=r)
        self.running = Gauge("kvrelay_engine_running", "Sequences running", registry=r)
        self.waiting = Gauge("kvrelay_engine_waiting", "Sequences waiting", registry=r)
        self.free_blocks = Gauge("kvrelay_engine_free_blocks", "Free KV cache blocks", registry=r)
        self.preemptions = Counter("kvrelay_engine_preemptions", "Sequences preempted", registry=r)
        # P/D
        self.publish_chunks = Counter("kvrelay_engine_published_chunks", "Chunks published", registry=r)
        self.publish_bytes = Counter("kvrelay_engine_published_bytes", "Bytes published", registry=r)
        self.publish_skipped = Counter("kvrelay_engine_publish_skipped_chunks",
                                       "Chunks the store already held (content-addressed)", registry=r)
        self.publish_lag = Histogram("kvrelay_engine_publish_lag_seconds",
                                     "Forward end to last layer committed", buckets=_LAT, registry=r)
        self.publish_errors = Counter("kvrelay_engine_publish_errors", "Publish failures", ["reason"], registry=r)
        self.pulls = Counter("kvrelay_engine_pulls", "Decode pulls by result (ok, recompute, fail)",
                             ["result", "reason"], registry=r)
        self.pull_bytes = Counter("kvrelay_engine_pulled_bytes", "Bytes pulled", registry=r)
        self.pull_time = Histogram("kvrelay_engine_pull_seconds", "Whole-request pull time", buckets=_LAT,
                                   registry=r)
        self.pull_skipped_tokens = Counter("kvrelay_engine_pull_skipped_tokens",
                                           "Prompt tokens not pulled because this engine held their prefix",
                                           registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
