"""A circuit breaker for the router's view of one component (a worker, the store), driven from one asyncio loop.

Closed: the component is used.  It opens after ``threshold`` consecutive failures, or at once on a failure
that means the process is gone (connection refused or reset) or on a failed health probe; while open the
component is skipped, so no request pays the timeout an earlier one paid.  The router's health loop is the
probe: a probe that succeeds half-opens it (used again; one failure re-opens it, one success closes it).

Owns: `Breaker` and its counters.  Must not touch: the calls or the probes themselves (pool.py, store.py);
kvrelay.connector.breaker is the threaded one the engines use (not imported: it brings the engine stack).
"""

from __future__ import annotations

import enum
import logging
import time
from typing import Callable

log = logging.getLogger("kvrelay.router.breaker")


class BreakerState(enum.Enum):
    CLOSED = "closed"  # in service
    OPEN = "open"  # skipped until a probe succeeds
    HALF_OPEN = "half_open"  # a probe succeeded: in service, and the next failure re-opens it


class Breaker:
    def __init__(self, name: str, threshold: int = 10, on_open: Callable[[], None] | None = None) -> None:
        if threshold < 1:
            raise ValueError(f"{name}: the breaker threshold must be at least 1 failure, got {threshold}")
        self.name, self.threshold, self.on_open = name, threshold, on_open
        self.state = BreakerState.CLOSED
        self.consecutive = 0  # failures since the last success
        self.failures = 0  # all failures (a metric)
        self.opened = 0  # times it opened (a metric)
        self.opened_at = 0.0
        self.last_error = ""

    @property
    def available(self) -> bool:
        return self.state is not BreakerState.OPEN

    def success(self) -> None:
        """A call succeeded (or, for a component only probed, the probe did)."""
        if self.state is not BreakerState.CLOSED:
            log.warning("%s is back in service", self.name)
        self.state = BreakerState.CLOSED
        self.consecutive = 0
        self.last_error = ""

    def failure(self, error: str, fatal: bool = False) -> bool:
        """A call failed; ``fatal``: the process is gone.  True if this opened the breaker."""
        self.failures += 1
        self.consecutive += 1
        self.last_error = error
        if self.state is BreakerState.OPEN:
            return False
        if fatal or self.state is BreakerState.HALF_OPEN or self.consecutive >= self.threshold:
            self._open(error)
            return True
        return False

    def probe_ok(self) -> None:
        """The health probe answered: an open breaker half-opens (a closed one keeps its failure count)."""
        if self.state is BreakerState.OPEN:
            log.warning("%s answers its health probe: back in service (half-open)", self.name)
            self.state = BreakerState.HALF_OPEN
            self.last_error = ""

    def probe_failed(self, error: str) -> None:
        self.last_error = error
        if self.state is not BreakerState.OPEN:
            self._open(error)

    def _open(self, error: str) -> None:
        self.state = BreakerState.OPEN
        self.opened += 1
        self.opened_at = time.monotonic()
        streak = f"; {self.consecutive} failures in a row" if self.consecutive > 1 else ""
        log.warning("%s is out of service (%s%s); probing it", self.name, error, streak)
        if self.on_open is not None:
            self.on_open()
