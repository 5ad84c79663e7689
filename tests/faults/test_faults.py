"""CI's share of the fault suite (`kvrelay bench faults` runs every scenario): the store killed with -9 under
streaming load through the router, restarted by `kvrelay up`.  Every answer is checked against a colocated
engine's with the official openai client; none may be wrong or hang, nothing may leak, and the cluster must
have the store back in service within seconds of its return."""

from __future__ import annotations

import pytest

from kvrelay.bench.faults import Figures, run_scenario

PULL_DEADLINE_S = 30.0  # the reference engine's default --pull-timeout


@pytest.mark.timeout(600)
def test_store_killed_under_load_costs_no_answer_and_leaks_nothing(tmp_path):
    fig: Figures = run_scenario("store-kill-and-restart", tmp_path, requests=12, concurrency=6,
                                num_prefill=1, num_decode=1)
    s = fig.summary()
    print(s)
    assert s["sent"] == 24  # the faulted round and the round after it
    assert s["wrong"] == 0 and s["hung"] == 0
    assert s["correct"] == s["sent"], [o for o in fig.outcomes if o.kind != "correct"]
    assert s["max_request_s"] < PULL_DEADLINE_S + 30  # no request waits out the deadline plus its compute
    hard = {k: v for k, v in fig.leaks.items() if not k.startswith(("fds:", "threads:"))}
    assert not any(hard.values()), hard  # shm segments, reservations, pins, sequences still held
    assert all(v <= 8 for k, v in fig.leaks.items() if k.startswith(("fds:", "threads:"))), fig.leaks
    assert s["recovery_s"] < 10, fig.notes  # every breaker closed (target 5 s; slack for a busy CI machine)
