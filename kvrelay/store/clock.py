"""The store core's clock, injected: TTLs, leases, reservation expiry and spill timing read it, so tests
advance time instead of sleeping.

Owns: `Clock` (the Protocol the core's parts see), `SystemClock` (the real one, the default) and
`ManualClock` (moves only when a test advances it).  Must not touch: anything else.  Background threads
still sleep in real time between their looks at the clock.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (deadlines, idle times)."""
        ...

    def time(self) -> float:
        """Wall-clock seconds since the epoch (what a person reads)."""
        ...


class SystemClock:
    """The real clocks: time.monotonic() and time.time()."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()


class ManualClock:
    """A clock that stands still until `advance` moves it (for tests).  Thread-safe."""

    def __init__(self, start: float = 1000.0, wall: float = 1.7e9) -> None:
        self._lock = threading.Lock()
        self._mono = start
        self._wall = wall

    def monotonic(self) -> float:
        with self._lock:
            return self._mono

    def time(self) -> float:
        with self._lock:
            return self._wall

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock cannot go back: advance({seconds})")
        with self._lock:
            self._mono += seconds
            self._wall += seconds
