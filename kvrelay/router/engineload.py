"""The requests an engine says it holds, from its /metrics page: the load the router did not send itself.

The router counts what it sent and has not seen end (pool.py: exact, no lag).  What it cannot count is
what other clients sent the same engine: the other processes of ``--workers N`` (each keeps its own
counts), another router, a client that goes to the engine directly.  The engines' /metrics show it, lagged
by the probe interval: the reference engine's ``kvrelay_engine_waiting`` + ``kvrelay_engine_running``,
vLLM's ``vllm:num_requests_waiting`` + ``vllm:num_requests_running`` (summed over their labels; vLLM's
``vllm:kv_cache_usage_perc`` is read too).  `others` is the part of the engine's count the router did not
send: the reading less the router's own requests in flight at that time (never below 0), so that the
router's exact count of its own requests is never replaced by a lagged one.

Only the lines of those metrics are parsed (a vLLM page is long; the probe runs on the router's loop).

Owns: `EngineLoad`, `parse_engine_load`.  Must not touch: the probes' schedule (app.py) or the workers'
own counts (pool.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kvrelay.promtext import parse_metrics, sum_samples

QUEUED = (("kvrelay_engine_waiting", "kvrelay_engine_running"),
          ("vllm:num_requests_waiting", "vllm:num_requests_running"))
KV_USAGE = "vllm:kv_cache_usage_perc"
NAMES = tuple(n for pair in QUEUED for n in pair) + (KV_USAGE,)


@dataclass(slots=True, frozen=True)
class EngineLoad:
    """One reading of an engine's /metrics."""
    requests: int  # waiting + running, as the engine counts them
    kv_usage: float | None = None  # fraction of its KV cache in use, where it says (vLLM)
    at: float = field(default_factory=time.monotonic)


def parse_engine_load(text: str) -> EngineLoad | None:
    """The engine's load on a /metrics page; None if the page has none of the metrics above."""
    lines = [ln for ln in text.splitlines() if ln.startswith(NAMES) or (ln.startswith("# TYPE ") and
                                                                       ln[7:].startswith(NAMES))]
    if not lines:
        return None
    samples = parse_metrics("\n".join(lines) + "\n")
    names = {key.partition("{")[0] for key in samples}
    for waiting, running in QUEUED:
        if waiting in names or running in names:
            usage = sum_samples(samples, KV_USAGE) if KV_USAGE in names else None
            return EngineLoad(round(sum_samples(samples, waiting) + sum_samples(samples, running)), usage)
    return None
