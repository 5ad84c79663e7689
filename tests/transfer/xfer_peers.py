"""Helpers for the transport conformance suite: spawn real peer processes on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from childenv import child_env
from kvrelay import proc
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
    child: proc.ChildProcess
    address: str
    pid: int
    regions: list[int]

    @property
    def proc(self) -> subprocess.Popen:
        return self.child.popen

    def expected(self, index: int) -> np.ndarray:
        from peer_main import region_bytes
        return region_bytes(self.seed, index, self.sizes[index])

    def kill(self) -> None:
        self.child.kill()
        self.child.close_pipes()

    def stop(self) -> None:
        """The peer serves until its stdin closes (resumed first, in case a test stopped it)."""
        if self.child.alive():
            self.child.signal(signal.SIGCONT)
        self.child.stop(10, sig=None)
        self.child.close_pipes()


def spawn_peer(transport: str, name: str = "peer", seed: int = 1, sizes: tuple[int, ...] = PEER_SIZES,
               compat: str = COMPAT, timeout: float = 240.0) -> PeerProc:
    """A peer process (peer_main.py) serving seeded regions; ready once it prints its JSON line."""
    env = child_env(**{"NIXL_LOG_LEVEL": os.environ.get("NIXL_LOG_LEVEL", "WARNING")})  # NIXL logs to stdout
    child = proc.spawn([sys.executable, str(PEER_MAIN), transport, name, compat, str(seed), *map(str, sizes)],
                       name=f"peer {name} ({transport})", env=env, pipes=True)
    try:
        meta = child.read_json_line(timeout)
    except proc.StartError:
        child.kill()
        child.close_pipes()
        raise
    return PeerProc(transport, name, seed, sizes, child, meta["address"], meta["pid"], meta["regions"])
