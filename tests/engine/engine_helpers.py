"""Helpers for the reference engine tests (a unique module name: test dirs share sys.path)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import torch

from kvrelay.store.pool import unlink_pool

TRANSPORTS = ("shm", "tcp", "nixl")



def rand_prompt(n: int, seed: int, vocab: int = 32000) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


class StoreProc:
    """A `kvrelay store` daemon on free ports (127.0.0.1), with its own /dev/shm pool."""

    def __init__(self, tmp: Path, pool_size: str = "1GiB", transports: str = "shm,tcp,nixl") -> None:
        self.tmp = tmp
        self.pool_name = f"kvrelay-enginetest-{uuid.uuid4().hex[:10]}"
        ready = tmp / f"store-{uuid.uuid4().hex[:6]}.json"
        self.log = open(tmp / "store.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvrelay.cli", "store", "--port", "0", "--metrics-port", "-1",
             "--pool-name", self.pool_name, "--pool-size", pool_size, "--transports", transports,
             "--ready-file", str(ready), "--log-level", "WARNING"], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"store did not start: {(tmp / 'store.log').read_text()[-2000:]}")
            time.sleep(0.05)
        self.info = json.loads(ready.read_text())
        self.address = self.info["address"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=15)
        self.log.close()
        unlink_pool(self.pool_name)
