"""`kvrelay router --workers N`: N processes on one port, each answering; SIGTERM stops them all."""

import json
import signal
import subprocess
import sys
import urllib.request

import pytest

from kvrelay import proc
from waiting import wait_until


@pytest.mark.timeout(120)
def test_two_router_processes_share_the_port(tmp_path):
    fake_ready, ready = tmp_path / "fake.json", tmp_path / "router.json"
    fake = proc.spawn([sys.executable, "-m", "kvrelay.bench.fakeworker", "--chunks", "3", "--ready-file",
                       str(fake_ready)], name="fake worker", log=tmp_path / "fake.log", ready_file=fake_ready)
    router = None
    try:
        url = fake.wait_ready(60)["url"]
        router = proc.spawn_kvrelay(["router", "--port", "0", "--workers", "2", "--prefill", url, "--decode", url],
                                    name="router", log=tmp_path / "router.log", ready_file=ready)
        info = router.wait_ready(90)
        assert len(info["workers"]) == 2 and info["pid"] == router.pid
        pids = set()
        for i in range(40):  # new connections: the kernel spreads them over both processes
            body = json.dumps({"prompt": f"p{i}", "stream": True}).encode()
            req = urllib.request.Request(info["url"] + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json", "Connection": "close"})
            with urllib.request.urlopen(req, timeout=30) as r:
                assert r.read().endswith(b"data: [DONE]\n\n")
            with urllib.request.urlopen(info["url"] + "/readyz", timeout=30) as r:
                pids.add(json.loads(r.read())["pid"])
        assert pids == set(info["workers"]), f"requests reached {pids}, not both of {info['workers']}"
        router.signal(signal.SIGTERM)
        assert router.wait(30) == 0
        for pid in info["workers"]:
            wait_until(lambda pid=pid: not proc.pid_alive(pid), 5, f"worker process {pid} gone with its parent")
    finally:
        for p in (router, fake):
            if p is not None:
                p.kill()

def test_bad_workers_flag():
    out = subprocess.run([sys.executable, "-m", "kvrelay.cli", "router", "--decode", "http://127.0.0.1:1",
                          "--workers", "0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--workers 0: give 1 to 64" in out.stderr and "Traceback" not in out.stderr
