"""The transfer-handle state machine every transport shares.

Owns: `Handle` (PENDING -> TRANSFERRING -> DONE | FAILED | CANCELLED), its deadline and its release.
A handle reaches a terminal state at the latest at its deadline: lazily when anyone looks at it
(`state`, `wait`) and eagerly when its transport's background thread sweeps expired handles.
Must not touch: how bytes move (a transport's data mover hands each handle its driver, the callbacks
below, when it constructs it: mover.py; nothing assigns them afterwards).

The driver's callbacks (all optional, called without the handle's lock held):
  * ``poll()``        progresses/checks the underlying operation (NIXL, nvlink); called from `wait`/`state`.
  * ``progress(t)``   receives the transfer's completion on the waiting thread, blocking up to ``t``
                      seconds (tcp direct transfers, large shm copies); `wait` and `state` drive it.
  * ``abort(state)``  stops the underlying operation after the handle turned FAILED or CANCELLED.
  * ``free()``        releases what the handle holds; called once, by `release`.

Thread safety: every method may be called from any thread.  A handle is cheap (one lock; the event a
waiter blocks on is made only when someone waits on an unfinished transfer): small transfers create
one per call, and its cost is part of every round trip.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Callable

from kvrelay.transfer.base import XferHandle, XferState

if TYPE_CHECKING:
    from kvrelay.transfer.control import PeerConn

# NIXL offers no completion event to Python, so a polled handle waits by checking its status: spin
# for a few microseconds (small transfers complete there), then sleep with a growing interval.
_SPIN_S = 50e-6
_MAX_SLEEP_S = 1e-3
_TERMINAL = (XferState.DONE, XferState.FAILED, XferState.CANCELLED)


def check_timeout(timeout: float) -> None:
    """ValueError unless a transfer's timeout is > 0 seconds."""
    if timeout <= 0:
        raise ValueError(f"transfer timeout must be > 0 seconds, got {timeout!r}")


class Handle(XferHandle):
    # Positional parameters (not keyword-only): the handle table constructs one per transfer, and passing
    # eleven arguments by position costs a fraction of passing them by name (measured: ~0.5 us here).
    def __init__(self, peer: str, op: str, nbytes: int, timeout: float,
                 poll: Callable[[], None] | None = None,
                 progress: Callable[[float], None] | None = None,
                 abort: Callable[[XferState], None] | None = None,
                 free: Callable[[], None] | None = None,
                 on_release: Callable[["Handle"], None] | None = None, conn: PeerConn | None = None,
                 started: float | None = None) -> None:
        if timeout <= 0:
            check_timeout(timeout)
        self.peer = peer
        self.op = op
        self.nbytes = nbytes
        self.timeout = timeout
        self.conn = conn  # the peer connection it runs on (endpoint transports fail it when that peer is lost)
        # ``started``: when the transfer was asked for (time.monotonic()), if before this handle was made
        self.deadline = (time.monotonic() if started is None else started) + timeout
        self._poll = poll
        self._progress = progress
        self._abort = abort
        self._free = free
        self._on_release = on_release
        self._lock = threading.Lock()
        self._event: threading.Event | None = None  # made by the first wait() on an unfinished handle
        self._done = False
        self._state = XferState.PENDING
        self._error: str | None = None
        self._released = False
        self.started_at = self.deadline - timeout
        self.finished_at: float | None = None

    # -- transitions (transports call these) -------------------------------------------------------
    def set_transferring(self) -> None:
        with self._lock:
            if self._state is XferState.PENDING:
                self._state = XferState.TRANSFERRING

    def finish(self, state: XferState, error: str | None = None) -> bool:
        """Move to a terminal state unless already terminal; True if this call made the move."""
        if state not in _TERMINAL:
            raise ValueError(f"finish() needs a terminal state, got {state}")
        if self._done:
            return False
        now = time.monotonic()
        if state is XferState.DONE and now > self.deadline:  # DONE means "within its deadline"
            state, error = XferState.FAILED, self._deadline_reason()
        with self._lock:
            if self._done:
                return False
            self._state = state
            self._error = error
            self.finished_at = now
            self._done = True
            event = self._event
        if event is not None:
            event.set()
        if state is not XferState.DONE and self._abort is not None:
            self._abort(state)
        return True

    def fail(self, reason: str) -> bool:
        return self.finish(XferState.FAILED, reason)

    def expire_if_due(self, now: float | None = None) -> bool:
        if (now if now is not None else time.monotonic()) < self.deadline:
            return False
        return self.fail(self._deadline_reason())

    def _deadline_reason(self) -> str:
        return (f"{self.op} of {self.nbytes} bytes with peer {self.peer!r} did not finish within its deadline of "
                f"{self.timeout:.3g}s (pass a larger timeout= if the link is slow)")

    # -- XferHandle --------------------------------------------------------------------------------
    @property
    def state(self) -> XferState:
        if not self._done:
            if self._poll is not None:
                self._poll()
            elif self._progress is not None:
                self._progress(0.0)
            self.expire_if_due()
        return self._state

    @property
    def error(self) -> str | None:
        return self._error

    @property
    def done(self) -> bool:
        return self._done

    def wait(self, timeout: float | None = None) -> XferState:
        if self._done:
            return self._state
        now = time.monotonic()
        until = self.deadline if timeout is None else min(self.deadline, now + max(0.0, timeout))
        if self._progress is not None:
            while not self._done and now < until:
                self._progress(until - now)
                now = time.monotonic()
        elif self._poll is None:
            self.block(until - now)
        else:
            sleep = 0.0
            spin_until = now + _SPIN_S
            while not self._done:
                self._poll()
                now = time.monotonic()
                if self._done or now >= until:
                    break
                if now >= spin_until:
                    sleep = min(_MAX_SLEEP_S, max(20e-6, sleep * 2), until - now)
                    time.sleep(sleep)
        self.expire_if_due()
        return self._state

    def block(self, timeout: float) -> None:
        """Sleep until the handle is terminal or ``timeout`` seconds pass (no progress, no expiry)."""
        with self._lock:
            if self._done:
                return
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        event.wait(max(0.0, timeout))

    def cancel(self) -> None:
        self.finish(XferState.CANCELLED, "cancelled by the caller")

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self.cancel()
        if self._free is not None:
            self._free()
        if self._on_release is not None:
            self._on_release(self)

    @property
    def released(self) -> bool:
        return self._released

    def __repr__(self) -> str:
        return f"Handle({self.op} {self.nbytes}B peer={self.peer!r} {self._state.value}{' ' + self._error if self._error else ''})"
