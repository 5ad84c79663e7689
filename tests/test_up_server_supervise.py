"""The supervisor keeps a server that is not a `kvrelay` subcommand (as `kvrelay up` does a vLLM server) up
through the `Server` protocol: a small HTTP server that forks a helper (as vLLM's API server forks its
EngineCore) is restarted on its port when killed with -9, the helper of the dead run is killed with it
(nothing orphaned), the state file shows it, and closing stops its whole process group."""

from __future__ import annotations

import os
import signal
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from kvrelay import proc, upstate
from kvrelay.httpjson import free_port
from kvrelay.supervisor import Backoff, Supervisor
from waiting import wait_until

pytestmark = pytest.mark.slow  # starts processes

SERVER = """
import http.server, os, sys, time
if os.fork() == 0:  # the helper: lives as long as nobody kills it
    while True:
        time.sleep(60)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


class ForkingServer:
    """A real server process with a forked helper in its group (implements kvrelay.supervisor.Server)."""

    def __init__(self, log: Path) -> None:
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: proc.ChildProcess | None = None

    def respawn(self, *, log_mode: str, log_header: str, die_with_parent: bool) -> proc.ChildProcess:
        self.process = proc.spawn([sys.executable, "-c", SERVER, str(self.port)], name="forking server",
                                  log=self.log, log_mode=log_mode, log_header=log_header, session=True,
                                  die_with_parent=die_with_parent)
        return self.process

    def ready_info(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=0.5) as r:
                ok = r.status == 200
        except OSError:
            return None
        assert self.process is not None
        return {"url": self.url, "port": self.port, "pid": self.process.pid, "health_url": f"{self.url}/health"} \
            if ok else None


def group_members(pgid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":  # pgrp, and not a zombie
                out.append(int(entry))
    return out


@pytest.mark.timeout(120)
def test_a_server_is_restarted_with_its_group(tmp_path, monkeypatch):
    monkeypatch.setenv("KVRELAY_RUNTIME_DIR", str(tmp_path / "run"))
    sup = Supervisor(tmp_path, backoff=Backoff(initial=0.1, maximum=0.2))
    server = ForkingServer(tmp_path / "srv.log")
    first = second = 0
    try:
        child = sup.spawn_server("srv", server, timeout=60)
        info = sup.wait_ready(child)
        first = info["pid"]
        wait_until(lambda: len(group_members(first)) == 2, 30, "the server and its forked helper")
        state = upstate.read_state(tmp_path)
        assert state is not None
        shown = {p["name"]: p for p in state["processes"]}["srv"]
        assert shown["supervised"] and shown["state"] == "running" and shown["health_url"] == f"{server.url}/health"

        os.kill(first, signal.SIGKILL)  # the leader only: its helper would be orphaned
        def restarted() -> bool:
            sup.step()  # what `Supervisor.supervise` runs on each wake-up
            return child.state == "running" and child.restarts == 1
        wait_until(restarted, 60, "the server restarted", interval=0.05)
        assert group_members(first) == [], "the killed server's helper outlived it"
        assert child.last_exit == -signal.SIGKILL and child.info["pid"] != first
        assert child.info["url"] == server.url  # same port
        second = child.info["pid"]
        wait_until(lambda: len(group_members(second)) == 2, 30, "the restarted server's helper")
        assert "restart 1 of srv" in (tmp_path / "srv.log").read_text()
    finally:
        for c in sup.children:  # stop every run's whole group, as `kvrelay up`'s HostProcesses does
            if c.process is not None:
                c.process.stop(5, group=True, wait_group=True)
        sup.close()
        left = group_members(second) if second else []
        for pgid in (first, second):  # whatever a failed check left behind
            if pgid and group_members(pgid):
                os.killpg(pgid, signal.SIGKILL)
    assert left == [], "closing left the server's group running"
