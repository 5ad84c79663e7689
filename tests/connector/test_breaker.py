"""CircuitBreaker: skips a dead component at once, probes in the background (or lets one caller probe),
and is back in service as soon as the component answers."""

from kvrelay.connector import BreakerState, CircuitBreaker
from waiting import wait_until


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
    wait_until(lambda: len(probes) >= 2, 5, "two background probes")
    assert not b.allow() and b.skipped == 2  # no caller is ever let through as the probe
    up["v"] = True
    wait_until(lambda: b.state is BreakerState.CLOSED, 5, "the breaker closed by its probe")
    assert b.allow() and b.opened == 1
    b.close()


def test_without_probe_one_caller_per_cooldown_probes():
    now = [100.0]  # the breaker's clock, advanced by hand: the cooldown passes exactly when the test says
    b = CircuitBreaker("peer", 0.05, clock=lambda: now[0])
    b.failure("x")
    assert not b.allow()
    now[0] += 0.049
    assert not b.allow()  # still cooling down
    now[0] += 0.002
    assert b.allow() and not b.allow()  # half-open: exactly one
    b.failure("still down")
    assert not b.allow()
    now[0] += 0.051
    assert b.allow()
    b.success()
    assert b.allow() and b.allow()
