"""Helpers for the store tests: a real `kvrelay store` daemon process, seeded chunks, waits, metrics."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import torch

from kvrelay.readyfile import wait_ready_file
from kvrelay.keys import ChunkKey
from kvrelay.store.pool import unlink_pool
from kvrelay.store.process import die_with_parent
from kvrelay.transfer.wire import ChunkHeader, checksum

COMPAT = "test-compat-0001"


class Daemon:
    def __init__(self, tmp: Path, **opts) -> None:
        self.tmp = tmp
        self.opts = opts
        self.pool_name = opts.pop("pool_name", f"kvrelay-test-{uuid.uuid4().hex[:12]}")
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}

    def start(self, timeout: float = 120.0) -> "Daemon":
        ready = self.tmp / f"ready-{uuid.uuid4().hex[:6]}.json"
        args = [sys.executable, "-m", "kvrelay.cli", "store", "--port", "0", "--metrics-port", "0",
                "--pool-name", self.pool_name, "--ready-file", str(ready), "--log-level", "WARNING"]
        for k, v in self.opts.items():
            args += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
        self.log = open(self.tmp / "daemon.log", "ab")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        try:
            self.info = wait_ready_file(ready, self.proc, timeout)
        except ChildProcessError:
            raise RuntimeError(f"daemon exited {self.proc.returncode}: {(self.tmp / 'daemon.log').read_text()}") from None
        except TimeoutError:
            self.kill()
            raise TimeoutError(f"daemon did not become ready within {timeout}s: "
                               f"{(self.tmp / 'daemon.log').read_text()[-2000:]}") from None
        return self

    @property
    def address(self) -> str:
        return self.info["address"]

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.info['metrics_port']}"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None
        if hasattr(self, "log"):
            self.log.close()

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
    """Test helper: re-check ``cond`` until true or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        time.sleep(0.05)


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
