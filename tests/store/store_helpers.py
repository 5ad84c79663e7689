"""Helpers for the store tests: a real `kvrelay store` daemon process, seeded chunks, waits, metrics."""

from __future__ import annotations

import signal
import socket
import subprocess
import uuid
from pathlib import Path

import torch

from kvrelay import proc
from kvrelay.keys import ChunkKey
from kvrelay.store.pool import unlink_pool
from kvrelay.transfer.wire import ChunkHeader, checksum
from waiting import wait_until

COMPAT = "test-compat-0001"


class Daemon:
    """A `kvrelay store` daemon process (kvrelay.proc): free ports, its own pool, its log in ``tmp``."""

    def __init__(self, tmp: Path, **opts) -> None:
        self.tmp = tmp
        self.opts = opts
        self.pool_name = opts.pop("pool_name", f"kvrelay-test-{uuid.uuid4().hex[:12]}")
        self.child: proc.ChildProcess | None = None
        self.info: dict = {}

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.child.popen if self.child is not None else None

    def start(self, timeout: float = 120.0) -> "Daemon":
        args = ["store", "--port", "0", "--metrics-port", "0", "--pool-name", self.pool_name, "--log-level", "WARNING"]
        for k, v in self.opts.items():
            args += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
        self.child = proc.spawn_kvrelay(args, name="store daemon", log=self.tmp / "daemon.log", log_mode="ab",
                                        ready_file=self.tmp / f"ready-{uuid.uuid4().hex[:6]}.json",
                                        die_with_parent=True, tail_lines=40)
        try:
            self.info = self.child.wait_ready(timeout)
        except proc.StartError:
            self.kill()
            raise
        return self

    @property
    def address(self) -> str:
        return self.info["address"]

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.info['metrics_port']}"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.child is not None:
            self.child.stop(15, sig=sig)  # ``sig``, then SIGKILL if it still runs after 15 s
        self.child = None

    def cleanup(self) -> None:
        self.kill()
        unlink_pool(self.pool_name)


def make_chunk(seed: int, nbytes: int, layer: int = 0, compat: str = COMPAT) -> tuple[ChunkKey, ChunkHeader, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    key = ChunkKey(f"{seed:032x}", layer, 0, 8)
    header = ChunkHeader(compat_hash=compat, layer=layer, token_start=0, token_end=16, head_start=0, head_end=8,
                         dtype="uint8", nbytes=nbytes, checksum=checksum(data))
    return key, header, data


def wait_for(cond, timeout: float = 10.0, what: str = "condition"):
    """The tests' one wait (tests/helpers/waiting.py), re-checking every 50 ms: a check that asks the daemon
    (stats) is control-plane traffic, and one every few ms would keep the spiller from ever seeing quiet."""
    return wait_until(cond, timeout, what, interval=0.05)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def local_conn(address: str, timeout: float = 10.0) -> socket.socket:
    """A raw connection to the daemon's same-host socket (its name comes from a hello)."""
    from kvrelay.store.client import StoreClient
    from kvrelay.store.local import to_sockaddr
    with StoreClient(address, compat_hash=COMPAT) as c:
        name = c.info["local"]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(to_sockaddr(name))
    return s


def local_reply(s: socket.socket):
    """Read one length-prefixed reply frame from a raw same-host connection."""
    from kvrelay.store import protocol as P
    from kvrelay.store.local import FRAME
    buf = b""
    while len(buf) < FRAME.size or len(buf) < FRAME.size + FRAME.unpack_from(buf)[0]:
        got = s.recv(65536)
        assert got, "the daemon closed the connection instead of answering"
        buf += got
    return P.decode_reply(buf[FRAME.size:FRAME.size + FRAME.unpack_from(buf)[0]])
