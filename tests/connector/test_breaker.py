"""CircuitBreaker: skips a dead component at once, probes in the background (or lets one caller probe),
and is back in service as soon as the component answers."""

import time

from kvrelay.connector import BreakerState, CircuitBreaker


def _wait(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_background_probe_closes_the_breaker_when_the_component_returns():
    up = {"v": False}
    probes = []

    def probe():
        probes.append(1)
        if not up["v"]:
            raise ConnectionError("down")

    b = CircuitBreaker("store", 0.05, probe=probe)
    assert b.allow()
    b.failure("boom")
    assert b.state is BreakerState.OPEN and not b.allow()
    _wait(lambda: len(probes) >= 2)
    assert not b.allow() and b.skipped == 2  # no caller is ever let through as the probe
    up["v"] = True
    _wait(lambda: b.state is BreakerState.CLOSED)
    assert b.allow() and b.opened == 1
    b.close()


def test_without_probe_one_caller_per_cooldown_probes():
    b = CircuitBreaker("peer", 0.05)
    b.failure("x")
    assert not b.allow()
    time.sleep(0.06)
    assert b.allow() and not b.allow()  # half-open: exactly one
    b.failure("still down")
    assert not b.allow()
    time.sleep(0.06)
    assert b.allow()
    b.success()
    assert b.allow() and b.allow()
