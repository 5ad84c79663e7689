"""The one way a test waits: until a condition holds, bounded by a deadline, failing with what it waited for.

Owns `wait_until` (threads, processes) and `await_until` (asyncio), and `Deadline` for loops that must do
something between checks (resend, read a log).  Tests never order events with a fixed sleep: they wait on
the state that proves the event happened.  It uses nothing of kvrelay but kvrelay.proc's polling wait.

Importable in every test as ``from waiting import wait_until`` (pyproject's pytest ``pythonpath``)."""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, TypeVar

from kvrelay import proc

T = TypeVar("T")

FIRST_POLL = 0.001  # the first re-check comes at once; the interval then doubles up to MAX_POLL
MAX_POLL = 0.05


def _message(what: str, timeout: float, last: object, detail: Callable[[], str] | None) -> str:
    msg = f"{what}: not reached within {timeout:g}s (last value: {last!r})"
    if detail is not None:
        msg += "\n" + detail()
    return msg


def wait_until(cond: Callable[[], T], timeout: float = 10.0, what: str = "condition",
               detail: Callable[[], str] | None = None, interval: float = 0.01) -> T:
    """Re-check ``cond()`` every ``interval`` s until it returns a truthy value, and return that value.  Past
    ``timeout`` seconds raise TimeoutError naming ``what`` (and ``detail()``, e.g. a log tail).  The polling
    is kvrelay.proc.wait_for's (the one wait of the code base); this adds the detail."""
    try:
        return proc.wait_for(cond, timeout, interval=interval, what=what)
    except TimeoutError as e:
        raise TimeoutError(f"{e}" + (f"\n{detail()}" if detail is not None else "")) from None


async def await_until(cond: Callable[[], T | Awaitable[T]], timeout: float = 10.0, what: str = "condition",
                      detail: Callable[[], str] | None = None) -> T:
    """`wait_until` for a test running in an event loop: ``cond`` may be a plain or an async callable; the loop
    keeps running between checks."""
    deadline = time.monotonic() + timeout
    interval = FIRST_POLL
    while True:
        value = cond()
        if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise TimeoutError(_message(what, timeout, value, detail))
        await asyncio.sleep(interval)
        interval = min(interval * 2, MAX_POLL)


class Deadline:
    """For loops that act between checks (resend a message, start a request): ``while not d.passed()``, then
    ``d.fail(...)``.  ``pause()`` yields the processor for one short poll interval."""

    def __init__(self, timeout: float, what: str) -> None:
        self.timeout, self.what = timeout, what
        self.end = time.monotonic() + timeout
        self._interval = FIRST_POLL

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def passed(self) -> bool:
        return time.monotonic() > self.end

    def check(self, detail: str = "") -> None:
        """Raise TimeoutError (naming what was awaited, and ``detail``) once the deadline has passed."""
        if self.passed():
            raise TimeoutError(f"{self.what}: not reached within {self.timeout:g}s" + (f"\n{detail}" if detail else ""))

    def pause(self) -> None:
        time.sleep(min(self._interval, self.left()))
        self._interval = min(self._interval * 2, MAX_POLL)

