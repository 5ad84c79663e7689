"""`kvrelay up` supervises its processes: a store, an engine or the router killed with -9 is restarted
on the same port, the store with what it had spilled to its SSD directory and none of its old /dev/shm
files; requests through the router still answer token-identically; `kvrelay status` shows the
restarts; stopping `kvrelay up` leaves nothing in /dev/shm.  One small cluster (reference engine,
default model)."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from kvrelay import proc
from upcluster import healthy
from waiting import wait_until

pytestmark = pytest.mark.slow  # starts several processes: not in the fast tier (-m 'not slow')

PROMPT = list(range(100, 400))  # 300 tokens: more than one 256-token chunk, so KV is published and pulled


def complete(url: str) -> list[int]:
    body = json.dumps({"prompt": PROMPT, "max_tokens": 8, "temperature": 0}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())["choices"][0]["token_ids"]


def answered(url: str) -> list[int] | None:
    """The answer, or None while the router has no worker in service (HTTP 503: it probes a restarted one)."""
    try:
        return complete(url)
    except urllib.error.HTTPError as exc:
        if exc.code != 503:
            raise
        return None


def wait_for(what: str, check, timeout: float = 120.0):
    """Poll ``check`` until it returns something true; TimeoutError naming ``what`` past the deadline."""
    return wait_until(check, timeout, what, interval=0.1)


def shm(prefix: str) -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))


def kvrelay_status(workdir: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvrelay.cli", "status", "--json", "--workdir", str(workdir)],
                          capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.timeout(400)
def test_up_restarts_a_killed_store_engine_and_router(tmp_path):
    workdir, env = tmp_path / "up", {**os.environ, "KVRELAY_RUNTIME_DIR": str(tmp_path / "run")}
    up_log = tmp_path / "up.log"
    up = proc.spawn_kvrelay(["up", "--port", "0", "--pool-size", "64MiB", "--workdir", str(workdir)],
                            name="kvrelay up", log=up_log, env=env)
    pool = f"kvrelay-up-{up.pid}"
    try:
        def serving():
            if up.poll() is not None:
                pytest.fail(f"kvrelay up exited with code {up.returncode}: {up_log.read_text(errors='replace')}")
            return (workdir / "router.ready.json").exists() and healthy(workdir)
        procs = wait_for("the cluster serving", serving, 300)
        assert set(procs) == {"store", "prefill0", "decode0", "router"}
        router = procs["router"]["address"]
        answer = complete(router)
        assert len(answer) == 8
        wait_for("the chunk spilled to the store's SSD directory", lambda: (workdir / "ssd" / "journal.log").exists()
                 and (workdir / "ssd" / "journal.log").stat().st_size > 0, 60)

        # the store, killed with -9: restarted on its port, with its SSD contents, and no old /dev/shm file
        store = procs["store"]
        old_inode = os.stat(f"/dev/shm/{pool}").st_ino
        t0 = time.monotonic()
        os.kill(store["pid"], signal.SIGKILL)
        procs = wait_for("the store restarted", lambda: healthy(workdir, store=1), 120)
        assert complete(router) == answer  # token-identical through the restarted store
        print(f"store kill -> cluster healthy and a request answered: {time.monotonic() - t0:.2f}s")
        assert procs["store"]["pid"] != store["pid"] and procs["store"]["address"] == store["address"]
        assert procs["store"]["last_exit"] == -signal.SIGKILL
        ready = json.loads((workdir / "store.ready.json").read_text())
        assert ready["recovered"] >= 1, ready  # what the killed store had spilled came back
        assert shm(pool) == [pool, pool + ".dir", pool + ".owner"]
        assert os.stat(f"/dev/shm/{pool}").st_ino != old_inode  # the killed store's segment is gone, not reused
        cli = kvrelay_status(workdir, env)
        assert cli.returncode == 0, cli.stderr
        shown = {p["name"]: p for p in json.loads(cli.stdout)["processes"]}
        assert shown["store"]["restarts"] == 1 and shown["decode0"]["restarts"] == 0

        # an engine, killed with -9: restarted on its port
        decode = procs["decode0"]
        os.kill(decode["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        procs = wait_for("decode0 restarted", lambda: healthy(workdir, store=1, decode0=1), 180)
        assert procs["decode0"]["address"] == decode["address"]
        assert wait_for("the router serving through the restarted decode0", lambda: answered(router), 60) == answer
        print(f"decode kill -> a request answered: {time.monotonic() - t0:.2f}s")

        # the router, killed with -9: restarted on its port (clients keep their URL)
        os.kill(procs["router"]["pid"], signal.SIGKILL)
        wait_for("the router restarted", lambda: healthy(workdir, store=1, decode0=1, router=1), 60)
        assert wait_for("the restarted router serving", lambda: answered(router), 60) == answer
    finally:
        up.stop(60)  # SIGTERM, up to 60 s for it to exit (then SIGKILL: the returncode assertion below fails)
        out = up_log.read_text(errors="replace")
    assert up.returncode == 0, out
    assert "store (pid" in out and "restarting it in 0.5s" in out, out
    assert out.count("restarting it in") == 3, out  # the exits of `kvrelay up`'s own stop are not crashes
    assert shm(pool) == [], "kvrelay up left its pool in /dev/shm"
    assert list((tmp_path / "run").glob("up-*.json")) == []
    cli = kvrelay_status(workdir, env)
    assert cli.returncode == 1 and "no `kvrelay up` is running" in cli.stderr and "Traceback" not in cli.stderr
