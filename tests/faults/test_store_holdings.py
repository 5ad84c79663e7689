"""The fault suite's watch of the store's pins and reserved bytes (kvrelay/bench/faults/holdings.py), against
a metrics page whose values the test sets: a release within a second of the last abort passes, a late one
is a leak that names what was held and for how long, and one that never comes is a leak too.

The rounds take each sample themselves (`StoreWatch.sample`) on a clock they advance, every `STEP` s of it,
and the page releases at an exact time of that clock: the verdicts depend on what the page served and when,
not on how the watch's thread is scheduled (a thread starved for 0.8 s on a loaded machine left no reading
that proved an in-time release, and the on-time round failed).  The sampling thread itself is checked on
its own (its readings are the page's values)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kvrelay.bench.faults.figures import Figures, Outcome
from kvrelay.bench.faults.holdings import ABORT_RELEASE_S, StoreWatch, check_release


class _Page:
    """A /metrics page serving the pins and reserved bytes the test sets."""

    def __init__(self) -> None:
        self.pins, self.reserved = 0, 0
        page = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                body = (f"kvrelay_store_pins {page.pins}\n"
                        f'kvrelay_store_bytes{{tier="reserved"}} {page.reserved}\n'
                        f'kvrelay_store_bytes{{tier="memory"}} 12345\n').encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"

    def set(self, pins: int, reserved: int) -> None:
        self.pins, self.reserved = pins, reserved

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


STEP = 1 / 32  # the rounds' sampling interval (SAMPLE_S's order; a binary fraction: exact sums)


class _Clock:
    """The watch's clock, advanced by the test."""

    def __init__(self) -> None:
        self.now = 1024.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def page():
    p = _Page()
    p.set(1, 100)  # held before the round: the values to come back to
    clock = _Clock()
    watch = StoreWatch(p.url, clock=clock)
    try:
        yield p, watch, clock
    finally:
        watch.stop()
        p.close()


def _round(p: _Page, watch: StoreWatch, clock: _Clock, release_after: float | None, limit: float = 5.0,
           no_reading_before: float = 0.0) -> Figures:
    """The store holds 4 more pins and 8 KiB more reserved bytes during a round whose requests were aborted;
    they are given back ``release_after`` s after the last abort (None: never).  The watch reads the page
    every `STEP` s from the abort until ``limit`` s after it (none before ``no_reading_before``: a starved
    watch)."""
    fig = Figures("client-disconnect")
    prior = watch.sample()
    assert prior is not None and (prior.pins, prior.reserved_bytes) == (1, 100)
    started = clock.now
    p.set(5, 100 + 8192)
    clock.now += STEP
    assert watch.sample() is not None  # the watch saw them held
    aborted = clock.now
    outcomes = [Outcome("correct", "disconnected", 0.1, ended=aborted - STEP), Outcome("correct", "disconnected",
                                                                                         0.1, ended=aborted)]
    released = False
    for k in range(1, int(limit / STEP) + 2):
        clock.now = aborted + k * STEP
        if release_after is not None and not released and k * STEP >= release_after:
            p.set(1, 100)
            released = True
        if k * STEP >= no_reading_before:
            assert watch.sample() is not None
    watch.stop()  # every reading is taken: the check judges them and waits for no more
    check_release(watch, prior, started, outcomes, fig, "round", limit=limit)
    return fig


def test_the_watch_thread_samples_the_page(page):
    p, _, _ = page
    p.set(3, 4096)
    watch = StoreWatch(p.url, interval=0.01).start()
    try:
        h = watch.latest()
        assert (h.pins, h.reserved_bytes) == (3, 4096) and h.start <= h.end
        p.set(1, 100)
        assert watch.released(h, h.start, 10.0)[0] is not None  # a later reading has them back
    finally:
        watch.stop()


def test_a_release_within_a_second_is_no_leak(page):
    p, watch, clock = page
    fig = _round(p, watch, clock, release_after=0.2)
    assert fig.leaks == {"store_pins_held_past_abort": 0, "store_reserved_bytes_held_past_abort": 0}, fig.notes
    assert fig.store_release_s == [7 * STEP]  # the first reading at or after 0.2 s
    assert [5, 8292] in [row[1:] for row in fig.store_timeline]  # the hold is on the timeline


def test_a_late_release_is_a_leak_that_lasts(page):
    p, watch, clock = page
    fig = _round(p, watch, clock, release_after=ABORT_RELEASE_S + 0.6)
    assert fig.leaks == {"store_pins_held_past_abort": 4, "store_reserved_bytes_held_past_abort": 8192}, fig.notes
    assert fig.store_release_s == [52 * STEP]  # the first reading at or after 1.6 s
    assert "still 4 pins and 8192 bytes over" in fig.notes[-1]


def test_a_release_that_never_comes_is_a_leak(page):
    p, watch, clock = page
    fig = _round(p, watch, clock, release_after=None, limit=1.5)
    assert fig.store_release_s == [float("inf")]
    assert fig.leaks["store_pins_held_past_abort"] == 4 and fig.summary()["leaks"] > 0
    assert fig.leaks["store_reserved_bytes_held_past_abort"] == 8192
    assert "not back within 1.5s of it" in fig.notes[-1]


def test_a_release_no_reading_proves_in_time_is_a_leak(page):
    """Released at 0.2 s, but the watch read nothing between the abort and 1.25 s (its thread starved): no
    reading shows the store back within the second, so the last one before counts (a busy machine cannot
    pass a late release)."""
    p, watch, clock = page
    fig = _round(p, watch, clock, release_after=0.2, no_reading_before=ABORT_RELEASE_S + 0.25)
    assert fig.leaks == {"store_pins_held_past_abort": 4, "store_reserved_bytes_held_past_abort": 8192}, fig.notes
    assert fig.store_release_s == [40 * STEP]
