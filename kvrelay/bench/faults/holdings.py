"""The store's pins and reserved bytes over time, read from its own /metrics while a scenario runs, so that
a release that waits for a lease or a reservation to run out shows up as a leak that lasts (issue 26).

Owns: `StoreWatch` (a thread that samples ``kvrelay_store_pins`` and ``kvrelay_store_bytes{tier="reserved"}``)
and `check_release` (after a round of aborted requests: both back to their values before it within
`ABORT_RELEASE_S` of the last abort, else a leak).  Must not touch: the store (it only reads its metrics).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from kvrelay.bench.faults.cluster import get, metric
from kvrelay.bench.faults.figures import Figures, Outcome
from kvrelay.bench.faults.leaks import PIN_TTL_S

ABORT_RELEASE_S = 1.0  # an aborted request gives back its pins and reserved bytes within this
SAMPLE_S = 0.05  # the watch reads the store's metrics this often
WATCH_LIMIT_S = PIN_TTL_S + 5.0  # how long a release that did not come in time is watched for (its lease)


@dataclass(frozen=True)
class Holding:
    """One reading: the store held ``pins`` and ``reserved_bytes`` at some moment in [start, end]."""
    start: float  # the watch's clock (time.monotonic()) when the scrape was sent
    end: float  # ... and when its answer arrived
    pins: int
    reserved_bytes: int

    def within(self, prior: "Holding") -> bool:
        return self.pins <= prior.pins and self.reserved_bytes <= prior.reserved_bytes


class StoreWatch:
    """Samples the store's pins and reserved bytes every `SAMPLE_S` on a thread, from ``start()`` to
    ``stop()``; the waits below block on its samples (with deadlines), never on a fixed sleep.  Samples are
    stamped by ``clock`` (time.monotonic; a test that takes each sample itself with `sample` passes a clock
    it advances, so that what the watch saw, and when, does not depend on how its thread is scheduled)."""

    def __init__(self, metrics_url: str, interval: float = SAMPLE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url = metrics_url
        self.interval = interval
        self.clock = clock
        self.samples: list[Holding] = []
        self.failed_reads = 0
        self.origin = clock()  # the timeline's zero
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-watch", daemon=True)

    def start(self, timeout: float = 10.0) -> "StoreWatch":
        self._thread.start()
        self.latest(timeout)
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.ident is not None:  # started (a watch sampled by hand has no thread)
            self._thread.join(10)

    def read(self) -> Holding:
        t0 = self.clock()
        text = get(self.url)
        return Holding(t0, self.clock(), int(metric(text, "kvrelay_store_pins")),
                       int(metric(text, "kvrelay_store_bytes", tier="reserved")))

    def sample(self) -> Holding | None:
        """Read the metrics once and record the reading (None: the read failed, counted in failed_reads)."""
        try:
            h = self.read()
        except (OSError, ValueError):  # the store restarting: its samples resume when it is back
            self.failed_reads += 1
            return None
        with self._cond:
            self.samples.append(h)
            self._cond.notify_all()
        return h

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def _first(self, cond, timeout: float) -> Holding | None:
        """The first sample (oldest first) with ``cond(sample)``, waiting up to ``timeout`` s for one (real
        seconds; none once the watch is stopped)."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for h in self.samples[seen:]:
                    if cond(h):
                        return h
                seen = len(self.samples)
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return None
                self._cond.wait(left)

    def latest(self, timeout: float = 10.0) -> Holding:
        """A sample that started now or later."""
        now = self.clock()
        h = self._first(lambda s: s.start >= now, timeout)
        if h is None:
            raise TimeoutError(f"no reading of the store's metrics ({self.url}) within {timeout:.0f}s "
                               f"({self.failed_reads} failed)")
        return h

    def released(self, prior: Holding, since: float, limit: float) -> tuple[Holding | None, list[Holding]]:
        """The first sample that started after ``since`` with pins and reserved bytes back to ``prior`` or
        below (None: none within ``limit`` s), and the samples that started in between."""
        back = self._first(lambda s: s.start >= since and s.within(prior), limit)
        with self._cond:
            upto = back.start if back is not None else since + limit
            between = [s for s in self.samples if since <= s.start < upto]
        return back, between

    def timeline(self, start: float, end: float) -> list[list[float]]:
        """[seconds since the watch began, pins, reserved bytes] at each change in [start, end]."""
        rows: list[list[float]] = []
        with self._cond:
            for s in self.samples:
                if start <= s.start <= end and (not rows or rows[-1][1:] != [s.pins, s.reserved_bytes]):
                    rows.append([round(s.start - self.origin, 3), s.pins, s.reserved_bytes])
        return rows


def check_release(watch: StoreWatch, prior: Holding, started: float, outcomes: list[Outcome], fig: Figures,
                  label: str, limit: float = WATCH_LIMIT_S) -> None:
    """After a round of requests that ``started`` with the store holding ``prior``: the store's pins and
    reserved bytes must be back to ``prior`` within `ABORT_RELEASE_S` of the round's last abort (the last
    request to end, if none was aborted).  What was still held past that is a leak (the most seen after
    `ABORT_RELEASE_S`); how long it lasted (watched up to ``limit`` s: a lease or TTL running out) goes in the
    figures and the notes."""
    aborts = [o.ended for o in outcomes if o.detail == "disconnected"]
    last = max(aborts or [o.ended for o in outcomes] or [watch.clock()])
    back, between = watch.released(prior, last, limit)
    release_s = back.end - last if back is not None else float("inf")
    due = last + ABORT_RELEASE_S
    late = [s for s in between if s.start >= due]
    if not late and (back is None or back.start > due):
        late = between[-1:]  # no reading proves it was back in time (a busy machine): the last one before counts
    pins = max((s.pins - prior.pins for s in late), default=0)
    nbytes = max((s.reserved_bytes - prior.reserved_bytes for s in late), default=0)
    for key, v in (("store_pins_held_past_abort", pins), ("store_reserved_bytes_held_past_abort", nbytes)):
        fig.leaks[key] = max(fig.leaks.get(key, 0), max(0, v))
    fig.store_release_s.append(release_s)
    fig.store_timeline += watch.timeline(started, last + min(release_s, limit))
    peak = max(between, key=lambda s: (s.pins, s.reserved_bytes), default=None)
    parts = [f"{label}: before it the store held {prior.pins} pins and {prior.reserved_bytes} reserved bytes",
             f"{len(aborts)} of {len(outcomes)} requests aborted, the last at t={last - watch.origin:.2f}s",
             f"back {release_s:.2f}s after it" if back is not None else f"not back within {limit:.1f}s of it"]
    if peak is not None:
        parts.append(f"at most {peak.pins} pins and {peak.reserved_bytes} reserved bytes after it")
    if late:
        parts.append(f"still {pins} pins and {nbytes} bytes over past the {ABORT_RELEASE_S:.0f}s limit: a leak")
    fig.notes.append("; ".join(parts))
