"""A circuit breaker for calls to a component that may die (the store, a transfer peer).

After a failure the breaker opens: callers skip the component at once (and degrade: publish nothing,
recompute) instead of each paying the timeout the first one paid.  With a ``probe`` (a cheap call such as
a ping), a background thread probes every ``cooldown_s`` and closes the breaker as soon as the component
answers, so no request is ever the probe; without one, the first caller after each cooldown is let
through as the probe (half-open).

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
    OPEN = "open"  # calls are skipped
    HALF_OPEN = "half_open"  # one probe call is in flight (no background probe)


class CircuitBreaker:
    def __init__(self, name: str, cooldown_s: float = 1.0, probe: Callable[[], object] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if cooldown_s <= 0:
            raise ValueError(f"cooldown_s must be positive, got {cooldown_s}")
        self.name, self.cooldown_s, self._clock = name, cooldown_s, clock
        self.probe = probe
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self._prober: threading.Thread | None = None
        self._stop = threading.Event()
        self.last_error = ""
        self.opened = 0  # times it opened (a metric)
        self.skipped = 0  # calls it refused
        self.on_skip: Callable[[], object] | None = None  # told of each refused call (a metric)

    @property
    def state(self) -> BreakerState:
        return self._state

    def allow(self) -> bool:
        """May a call go through now?"""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return True
            if (self.probe is None and self._state is BreakerState.OPEN
                    and self._clock() - self._opened_at >= self.cooldown_s):
                self._state = BreakerState.HALF_OPEN
                return True
            self.skipped += 1
        if self.on_skip is not None:
            self.on_skip()
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
                log.warning("%s failed (%s): skipping it, probing every %.1fs", self.name, error, self.cooldown_s)
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()
            self.last_error = error
            if self.probe is not None and (self._prober is None or not self._prober.is_alive()):
                self._prober = threading.Thread(target=self._probe_loop, name=f"probe {self.name}", daemon=True)
                self._prober.start()

    def close(self) -> None:
        """Stop probing (the owner is shutting down)."""
        self._stop.set()

    def _probe_loop(self) -> None:
        probe = self.probe
        assert probe is not None  # started only with a probe
        while not self._stop.wait(self.cooldown_s):
            try:
                probe()
            except Exception as exc:  # noqa: BLE001 - still down: keep probing
                with self._lock:
                    self.last_error = f"{type(exc).__name__}: {exc}"
                continue
            self.success()
            return
