"""Helpers for the transport conformance suite: spawn real peer processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from kvrelay.transfer import available_transports

PEER_MAIN = Path(__file__).with_name("peer_main.py")
ROOT = Path(__file__).resolve().parents[2]
COMPAT = "compat-test-1"
MIB = 1 << 20
# Peer regions: two small ones for random descriptors, one 64 MiB for the large cases.
PEER_SIZES = (3 * MIB + 17, 1 * MIB, 64 * MIB)
TRANSPORTS = list(available_transports())


def transport_params():
    out = []
    for name, reason in available_transports().items():
        if name == "nvlink" and reason is None:
            reason = "CUDA memory: covered by test_nvlink_gpu.py (this suite compares host buffers)"
        marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@dataclass
class PeerProc:
    transport: str
    name: str
    seed: int
    sizes: tuple[int, ...]
    proc: subprocess.Popen
    address: str
    pid: int
    regions: list[int]

    def expected(self, index: int) -> np.ndarray:
        sys.path.insert(0, str(PEER_MAIN.parent))
        from peer_main import region_bytes
        return region_bytes(self.seed, index, self.sizes[index])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def spawn_peer(transport: str, name: str = "peer", seed: int = 1, sizes: tuple[int, ...] = PEER_SIZES,
               compat: str = COMPAT, timeout: float = 240.0) -> PeerProc:
    env = dict({"NIXL_LOG_LEVEL": "WARNING"}, **os.environ)  # NIXL logs to stdout, unread after start-up
    env = dict(env, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, str(PEER_MAIN), transport, name, compat, str(seed), *map(str, sizes)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, env=env)  # unbuffered: see select()
    deadline = time.monotonic() + timeout
    import select
    while True:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            proc.kill()
            raise TimeoutError(f"peer {name} ({transport}) did not start within {timeout}s")
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"peer {name} ({transport}) exited with {proc.wait()} before it was ready")
        if line.startswith(b"{"):
            meta = json.loads(line)
            return PeerProc(transport, name, seed, sizes, proc, meta["address"], meta["pid"], meta["regions"])


