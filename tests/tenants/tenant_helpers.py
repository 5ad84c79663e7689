"""Helpers for the tenant tests: a `StoreCore` in this process (no daemon: the tenant rules are the core's),
chunks put into it the way a same-host publisher does (reserve, write the pool slot, commit), reads, and
waits for the SSD spill."""

from __future__ import annotations

import uuid

import torch

from kvrelay.keys import ChunkKey, block_hashes, kid_of
from kvrelay.store.core import StoreCore
from kvrelay.transfer.wire import ChunkHeader, checksum
from waiting import wait_until

COMPAT = "tenants-compat-1"
CHUNK = 64 << 10


def chunk_keys_for(prompt: list[int], salt: str, layers: int = 2) -> list[ChunkKey]:
    """The keys a publisher of ``prompt`` under ``salt`` uses (chunks of 16 tokens, every layer)."""
    return [ChunkKey(h, layer, 0, 8) for h in block_hashes(prompt, 16, "m", COMPAT, salt) for layer in range(layers)]


def payload(seed: int, nbytes: int = CHUNK) -> torch.Tensor:
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def put(core: StoreCore, key: ChunkKey, data: torch.Tensor, tenant: str = "") -> None:
    """Publish one chunk as a same-host client does: reserve, write the pool slot, commit (verified)."""
    [slot] = core.reserve(f"req-{uuid.uuid4().hex[:8]}", [key], [data.numel()], 60.0, COMPAT, tenant)
    if not slot.present:
        core.pool.view[slot.offset:slot.offset + data.numel()] = data.numpy().tobytes()
        header = ChunkHeader(compat_hash=COMPAT, layer=key.layer, token_start=0, token_end=16, head_start=0,
                             head_end=8, dtype="uint8", nbytes=data.numel(), checksum=checksum(data))
        core.commit(key, header, COMPAT, verify=True)


def read(core: StoreCore, key: ChunkKey, timeout: float = 30.0) -> bytes | None:
    """The chunk's bytes as a puller gets them (read back from SSD first if need be), or None if it is a miss."""
    def attempt() -> tuple[bytes | None] | None:  # (the bytes or None for a miss), or None: not back yet
        got = core.acquire(key)
        if got is not None:
            slot, _ = got
            out = bytes(core.pool.view[slot.offset:slot.offset + slot.nbytes])
            core.unpin([slot.pin])
            return (out,)
        return (None,) if core.ix.get(kid_of(key)) is None else None
    return wait_until(attempt, timeout, f"{kid_of(key)} back from SSD")[0]


def wait_spilled(core: StoreCore, keys: list[ChunkKey], timeout: float = 60.0) -> None:
    wait_until(lambda: all((e := core.ix.get(kid_of(k))) is not None and e.on_ssd for k in keys), timeout,
               f"{len(keys)} chunks spilled")
