"""`kvrelay up --demo`, the README's main job: real store, prefill, decode, router and colocated engine
processes on 127.0.0.1; P/D answers must be token-identical to colocated and the KV must really move."""

import subprocess
import sys

import pytest


@pytest.mark.timeout(600)
@pytest.mark.parametrize("transport", ["shm"])
def test_up_demo(tmp_path, transport):
    proc = subprocess.run([sys.executable, "-m", "kvrelay.cli", "up", "--demo", "--requests", "3",
                           "--transport", transport, "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=540)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "3 requests, all P/D outputs match the colocated engine" in out
    assert out.count("pulled") == 3, out
