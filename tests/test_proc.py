"""kvrelay.proc, the one way kvrelay spawns a child: its ready file, a child that exits or hangs before it is
ready (exit code, last log line, tail), a peer's JSON line and stop by closing its stdin, stopping a whole
process group, and the liveness of a pid (a zombie and a reused pid are dead).  Real processes, no sleeps:
every wait is on a condition with a deadline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvrelay import proc

pytestmark = pytest.mark.timeout(120)
PY = sys.executable


def test_wait_ready_returns_the_ready_file_and_stop_ends_the_child(tmp_path):
    ready = tmp_path / "r.json"
    ready.write_text('{"stale": true}')  # an earlier run's file must not pass for this one's
    code = ("import os, sys, time; from kvrelay.readyfile import write_ready_file; print('starting', flush=True); "
            "write_ready_file(sys.argv[1], {'pid': os.getpid()}); time.sleep(120)")
    with proc.spawn([PY, "-c", code, str(ready)], name="child", log=tmp_path / "c.log", ready_file=ready) as child:
        assert child.wait_ready(60) == {"pid": child.pid}
        assert child.alive() and proc.pid_alive(child.pid)
    assert child.returncode == -15 and not proc.pid_alive(child.pid)
    assert "starting" in child.log_tail()


def test_a_child_that_exits_first_is_reported_with_its_code_and_last_log_line(tmp_path):
    child = proc.spawn([PY, "-c", "import sys; print('kvrelay store: --pool-size 0 is too small'); sys.exit(2)"],
                       name="store", log=tmp_path / "s.log", ready_file=tmp_path / "s.json")
    with pytest.raises(proc.ChildExited) as err:
        child.wait_ready(60)
    e = err.value
    assert isinstance(e, proc.StartError) and isinstance(e, ChildProcessError)
    assert e.code == 2 and e.line == "kvrelay store: --pool-size 0 is too small"
    assert str(e).startswith("store exited with code 2 before it was ready; its log: ")
    assert "too small" in e.tail


def test_a_child_that_is_not_ready_in_time_is_left_running_for_the_caller(tmp_path):
    child = proc.spawn([PY, "-c", "import time; time.sleep(120)"], name="slow", log=proc.DISCARD,
                       ready_file=tmp_path / "never.json")
    try:
        with pytest.raises(proc.ChildTimeout) as err:
            child.wait_ready(0.2)
        assert isinstance(err.value, TimeoutError) and err.value.code is None and child.alive()
    finally:
        assert child.stop(10) == -15


def test_a_peer_prints_a_json_line_and_stops_when_its_stdin_closes():
    code = "import json, sys; print('noise'); print(json.dumps({'address': 'tcp://x'}), flush=True); sys.stdin.read()"
    child = proc.spawn([PY, "-c", code], name="peer", log=proc.DISCARD, pipes=True)
    assert child.read_json_line(60) == {"address": "tcp://x"}
    assert child.stop(30, sig=None) == 0  # it exited by itself once its stdin closed
    child.close_pipes()


def test_a_peer_that_dies_before_its_line_is_reported(tmp_path):
    child = proc.spawn([PY, "-c", "import sys; sys.exit('no CUDA here')"], name="peer", pipes=True,
                       log=tmp_path / "err.log")
    with pytest.raises(proc.ChildExited, match="peer exited with code 1") as err:
        child.read_json_line(60)
    assert "no CUDA here" in err.value.tail
    child.close_pipes()


def test_kill_reaches_the_grandchildren_of_a_child_with_its_own_session(tmp_path):
    """The child ignores SIGTERM and has started a grandchild: past the grace, SIGKILL goes to the group."""
    code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            "from kvrelay.readyfile import write_ready_file; write_ready_file(sys.argv[1], {'grandchild': g.pid}); "
            "time.sleep(120)")
    ready = tmp_path / "r.json"
    child = proc.spawn([PY, "-c", code, str(ready)], name="parent", log=tmp_path / "p.log", ready_file=ready,
                       session=True)
    grandchild = child.wait_ready(60)["grandchild"]
    assert proc.pid_alive(grandchild)
    assert child.stop(0.5) == -9
    proc.wait_for(lambda: not proc.pid_alive(grandchild), 30, what="the grandchild gone")


def test_stop_all_stops_every_child_under_one_deadline():
    children = [proc.spawn([PY, "-c", "import time; time.sleep(120)"], name=f"c{i}", log=proc.DISCARD)
                for i in range(3)]
    proc.stop_all(children, 10)
    assert [c.returncode for c in children] == [-15, -15, -15]


def test_liveness_a_zombie_and_a_reused_pid_are_dead():
    me = os.getpid()
    assert proc.pid_alive(me, proc.start_time(me))
    assert not proc.pid_alive(me, "1")  # another process's start time: the pid was reused
    p = subprocess.Popen([PY, "-c", "pass"])  # not reaped until p.wait(): a zombie meanwhile
    try:
        proc.wait_for(lambda: Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z", 60,
                      what="the child a zombie")
        assert not proc.pid_alive(p.pid) and proc.start_time(p.pid) is None
    finally:
        p.wait()
    assert not proc.pid_alive(p.pid)


def test_spawn_refuses_a_log_it_cannot_use(tmp_path):
    with pytest.raises(ValueError, match="log_mode"):
        proc.spawn([PY, "-c", "pass"], log=tmp_path / "x.log", log_mode="w")
    with pytest.raises(ValueError, match="TO_STDOUT with pipes"):
        proc.spawn([PY, "-c", "pass"], log=proc.TO_STDOUT, pipes=True)
