"""A circuit breaker for calls to a component that may die (the store, a transfer peer).

After a failure the breaker opens: callers skip the component at once (and degrade: publish nothing,
recompute) instead of each paying the timeout the first one paid.  Once ``cooldown_s`` has passed, the
next caller is let through as a probe (half-open): success closes the breaker, failure opens it again.

Owns: `CircuitBreaker`.  Must not touch: the calls themselves.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from typing import Callable

log = logging.getLogger("kvrelay.connector.breaker")


class BreakerState(enum.Enum):
    CLOSED = "closed"  # calls go through
    OPEN = "open"  # calls are skipped until the cooldown passed
    HALF_OPEN = "half_open"  # one probe call is in flight


class CircuitBreaker:
    def __init__(self, name: str, cooldown_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        if cooldown_s <= 0:
            raise ValueError(f"cooldown_s must be positive, got {cooldown_s}")
        self.name, self.cooldown_s, self._clock = name, cooldown_s, clock
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self.last_error = ""
        self.opened = 0  # times it opened (a metric)
        self.skipped = 0  # calls it refused

    @property
    def state(self) -> BreakerState:
        return self._state

    def allow(self) -> bool:
        """May a call go through now?  In the open state, True once per cooldown (the probe)."""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return True
            if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.cooldown_s:
                self._state = BreakerState.HALF_OPEN
                return True
            self.skipped += 1
            return False

    def success(self) -> None:
        with self._lock:
            if self._state is not BreakerState.CLOSED:
                log.warning("%s is back: resuming calls", self.name)
            self._state = BreakerState.CLOSED

    def failure(self, error: str) -> None:
        with self._lock:
            if self._state is BreakerState.CLOSED:
                self.opened += 1
                log.warning("%s failed (%s): skipping it for %.1fs, then probing", self.name, error,
                            self.cooldown_s)
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()
            self.last_error = error
