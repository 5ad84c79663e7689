"""Against herding: which workers a cache preference may choose among, and how to choose among them.

A cache-aware router herds when the workers that hold a popular prefix look cheap to every request at
once: each new request adds little work there (its prefix is cached), so all of them go there, its queue
grows while the other workers idle, and the tail and the throughput pay (`kvrelay bench router`, issue 25:
p99 1.91x and 0.69x the requests/s of round robin).  What the peers do against it:

- SGLang's router routes by prefix match unless the load is imbalanced (the busiest worker's queue is
  above the idlest's by more than ``balance_abs_threshold`` requests *and* more than
  ``balance_rel_threshold`` times it); then the shortest queue takes the request.
- Dynamo's KV router scores ``overlap_score_weight x new prefill blocks + active blocks`` and samples among
  the workers by a softmax of their costs at ``router_temperature`` (0: the best one).
- llm-d's scheduler adds weighted scorers: prefix hit, queue depth, KV-cache utilization.

Here, per worker rather than all or nothing (`Balance`): a worker is *eligible* for the cost rule only
while its requests (`Worker.depth`: this router's in flight, plus those its engine's /metrics showed from
other clients) are within the thresholds of the least busy worker's (``--balance-abs``
requests more, or ``--balance-rel`` times as many, whichever allows more); the least cost among the
eligible wins (policy.py's cost: Dynamo's, in tokens), or, with ``--route-temperature`` above 0, a softmax
draw over the eligible workers' costs normalized to [0, 1].  The guard counts requests, not tokens, on
purpose: a hot prefix makes each request *look* cheap in tokens on its holder (which is the herding), and a
stale cache view (an engine evicted what the router believes it holds) makes them look cheaper than they
are; a count of requests is fooled by neither.  So a hot prefix spreads to a second worker once its holder
is ``--balance-abs`` requests deeper, that worker computes the prefix once and holds it too, and from there
the cost rule balances the two.

Owns: `Balance` (the thresholds, the temperature) and the choice among workers.  Must not touch: the
workers' load counts (pool.py) or the cost of a worker (policy.py).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvrelay.router.pool import Worker


@dataclass(slots=True, frozen=True)
class Balance:
    """The anti-herding guard (``abs_requests``/``rel``) and the sampling temperature of cache_aware routing."""
    abs_requests: int = 4  # --balance-abs: a worker this many requests deeper than the idlest ...
    rel: float = 1.5  # --balance-rel: ... and this many times as deep is passed over (0: no guard)
    temperature: float = 0.0  # --route-temperature: 0 picks the least cost; above 0 samples near-best workers
    request_tokens: int = 32  # --request-tokens: a request's fixed cost on an engine, in prompt tokens
    rng: random.Random = field(default_factory=lambda: random.Random(0), compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.abs_requests < 0:
            raise ValueError(f"--balance-abs {self.abs_requests}: must be 0 (no guard) or a number of requests")
        if not (math.isfinite(self.rel) and self.rel >= 1.0):
            raise ValueError(f"--balance-rel {self.rel:g}: must be a ratio of at least 1 (the busiest worker's "
                             f"requests over the idlest's)")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"--route-temperature {self.temperature:g}: must be 0 (the least cost) or a positive "
                             f"number")
        if self.request_tokens < 0:
            raise ValueError(f"--request-tokens {self.request_tokens}: must be 0 or a positive number of tokens")

    def eligible(self, workers: Sequence[Worker], depth: Callable[[Worker], int]) -> list[Worker]:
        """The workers not too deep to be chosen by cost: ``depth(w)`` (requests) at most the idlest's plus
        ``abs_requests`` or at most ``rel`` times it (abs 0: no guard, every worker)."""
        if self.abs_requests == 0 or len(workers) < 2:
            return list(workers)
        least = min(depth(w) for w in workers)
        cap = max(least + self.abs_requests, self.rel * least)
        return [w for w in workers if depth(w) <= cap]

    def choose(self, workers: Sequence[Worker], cost: Callable[[Worker], float]) -> Worker:
        """The worker of least cost (ties: fewest in flight), or a softmax draw at ``temperature`` over the
        costs normalized by their range (Dynamo's router_temperature)."""
        if not workers:
            raise ValueError("no worker to choose among")
        costs = [cost(w) for w in workers]
        if self.temperature <= 0 or len(workers) == 1:
            pairs = zip(costs, workers, strict=True)
            return min(pairs, key=lambda cw: (cw[0], cw[1].in_flight, cw[1].breaker.consecutive))[1]
        lo, hi = min(costs), max(costs)
        span = (hi - lo) or 1.0
        weights = [math.exp(-(c - lo) / span / self.temperature) for c in costs]
        return self.rng.choices(list(workers), weights)[0]
