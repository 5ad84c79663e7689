"""Helpers for the reference engine tests (a unique module name: test dirs share sys.path): random prompts and
a real store daemon."""

from __future__ import annotations

import uuid
from pathlib import Path

import torch

from kvrelay import proc
from kvrelay.store.pool import unlink_pool

TRANSPORTS = ("shm", "tcp", "nixl")



def rand_prompt(n: int, seed: int, vocab: int = 32000) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


class StoreProc:
    """A `kvrelay store` daemon on free ports (127.0.0.1), with its own /dev/shm pool (kvrelay.proc)."""

    def __init__(self, tmp: Path, pool_size: str = "1GiB", transports: str = "shm,tcp,nixl",
                 extra: tuple[str, ...] = ()) -> None:
        """``extra``: more `kvrelay store` flags (e.g. ``--events tcp://127.0.0.1:0``)."""
        self.tmp = tmp
        self.pool_name = f"kvrelay-enginetest-{uuid.uuid4().hex[:10]}"
        self.child = proc.spawn_kvrelay(
            ["store", "--port", "0", "--metrics-port", "-1", "--pool-name", self.pool_name, "--pool-size", pool_size,
             "--transports", transports, "--log-level", "WARNING", *extra],
            name="store", log=tmp / "store.log", log_mode="ab", ready_file=tmp / f"store-{uuid.uuid4().hex[:6]}.json")
        try:
            self.info = self.child.wait_ready(60)
        except proc.StartError:
            self.close()
            raise
        self.address = self.info["address"]

    def close(self) -> None:
        self.child.kill()
        unlink_pool(self.pool_name)
