"""The pieces of `kvrelay up`'s supervision that need no cluster: the backoff policy, pinning a restarted
process's ports, giving a process up, the sweep of dead stores' pools, and `kvrelay status`'s display."""

import os
import subprocess
import sys
import time
import uuid

import pytest

from kvrelay.proc import start_time
from kvrelay.status import duration, exit_text
from kvrelay.store.pool import OWNER_SUFFIX, read_owner, sweep_stale_pools, unlink_pool, write_owner
from kvrelay.supervisor import Backoff, Supervisor, pin_ports


def test_backoff_doubles_to_its_cap_resets_after_a_healthy_run_and_gives_up():
    b = Backoff(initial=0.5, factor=2, maximum=10, healthy_after=30, max_restarts=7)
    assert [b.delay(1.0) for _ in range(7)] == [0.5, 1, 2, 4, 8, 10, 10]
    assert b.delay(1.0) is None  # the 8th quick exit in a row: given up
    assert b.delay(31.0) == 0.5  # a run of healthy_after seconds starts the series again
    assert b.delay(0.0) == 1
    assert Backoff(max_restarts=0).delay(100.0) is None  # 0: never restart
    with pytest.raises(ValueError, match="max_restarts"):
        Backoff(max_restarts=-1)
    with pytest.raises(ValueError, match="initial"):
        Backoff(initial=0)


def test_pin_ports_writes_the_first_runs_ports():
    store = pin_ports(["store", "--port", "0", "--metrics-port", "0", "--pool-size", "1GiB"],
                      {"address": "tcp://127.0.0.1:5601", "metrics_port": 9100, "pid": 1})
    assert store == ["store", "--port", "5601", "--metrics-port", "9100", "--pool-size", "1GiB"]
    engine = pin_ports(["engine", "--role", "decode", "--port", "0"], {"port": 8123, "url": "http://127.0.0.1:8123"})
    assert engine == ["engine", "--role", "decode", "--port", "8123"]
    assert pin_ports(["router"], {"port": 8000}) == ["router", "--port", "8000"]


@pytest.mark.timeout(120)
def test_a_process_that_keeps_failing_is_given_up(tmp_path):
    """A store that cannot start (its pool size is refused: exit 2) is restarted max_restarts times, then left."""
    sup = Supervisor(tmp_path, backoff=Backoff(initial=0.01, maximum=0.02, max_restarts=2))
    child = sup.spawn("store", ["store", "--port", "0", "--metrics-port", "-1", "--pool-size", "0"])
    try:
        deadline = time.monotonic() + 100
        while child.state != "failed" and time.monotonic() < deadline:
            wait = sup.step()
            time.sleep(min(wait if wait is not None else 0.05, 0.05))
        assert child.state == "failed" and child.restarts == 2 and child.last_exit == 2
        assert sup.step() is None  # nothing left to do: the loop sleeps until a signal
        assert "restart 2 of store" in child.log_path.read_text()  # each run's log is kept
    finally:
        sup.close()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _fake_pool(owner: str | None) -> str:
    name = f"kvrelay-test-{uuid.uuid4().hex[:12]}"
    for suffix in ("", ".dir"):
        with open(f"/dev/shm/{name}{suffix}", "wb") as f:
            f.write(b"\0" * 4096)
    if owner is not None:
        with open(f"/dev/shm/{name}{OWNER_SUFFIX}", "w") as f:
            f.write(owner)
    return name


def test_sweep_removes_pools_of_dead_owners_only():
    me = os.getpid()
    dead = _fake_pool(f"{_dead_pid()} 1\n")
    reused = _fake_pool(f"{me} 1\n")  # this pid, but another start time: the owner died and its pid was reused
    alive = _fake_pool(f"{me} {start_time(me)}\n")
    unknown = _fake_pool(None)  # no owner file: nobody can tell, so it stays
    names = [dead, reused, alive, unknown]
    try:
        gone = sweep_stale_pools()
        assert dead in gone and reused in gone and alive not in gone and unknown not in gone
        for name in (dead, reused):
            assert not any(os.path.exists(f"/dev/shm/{name}{s}") for s in ("", ".dir", OWNER_SUFFIX))
        for name in (alive, unknown):
            assert os.path.exists(f"/dev/shm/{name}") and os.path.exists(f"/dev/shm/{name}.dir")
    finally:
        for name in names:
            unlink_pool(name)
    assert not [n for n in os.listdir("/dev/shm") if any(n.startswith(name) for name in names)]


def test_owner_file_names_this_process():
    name = f"kvrelay-test-{uuid.uuid4().hex[:12]}"
    try:
        write_owner(name)
        assert read_owner(name) == (os.getpid(), start_time(os.getpid()))
        assert name not in sweep_stale_pools()
    finally:
        unlink_pool(name)
    assert read_owner(name) is None


def test_status_display_helpers():
    assert exit_text(None) == "-" and exit_text(0) == "0" and exit_text(-9) == "-9 (SIGKILL)"
    assert duration(None) == "-" and duration(5.2) == "5s" and duration(125) == "2m05s" and duration(3725) == "1h02m"
