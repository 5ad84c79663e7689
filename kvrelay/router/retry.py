"""How the router retries a failed leg: attempts, and a full-jitter exponential backoff between them.

The gateways' defaults: 5 retries, the n-th after a random wait in [0, min(cap, base * 2**(n-1))) ("full
jitter": retries of many requests that failed together do not arrive together).

Owns: `RetryPolicy`.  Must not touch: what is retried (legs.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable


@dataclass(slots=True, frozen=True)
class RetryPolicy:
    retries: int = 5  # attempts after the first
    backoff: float = 0.05  # seconds: the first retry's cap
    backoff_max: float = 1.0  # seconds: no retry waits longer
    jitter: Callable[[], float] = field(default=random.random, repr=False)  # in [0, 1); tests pin it

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"--retries {self.retries}: must be 0 (no retry) or more")
        if self.backoff < 0 or self.backoff_max < self.backoff:
            raise ValueError(f"--retry-backoff {self.backoff} / --retry-backoff-max {self.backoff_max}: need "
                             f"0 <= backoff <= backoff max (seconds)")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first retry)."""
        return self.jitter() * min(self.backoff_max, self.backoff * 2 ** (retry - 1))
