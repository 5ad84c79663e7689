"""Paged KV-cache block allocation with prefix caching (nano-vllm style).

Owns: which cache blocks each sequence holds, reference counts, and the hash -> block map that lets a
new sequence reuse the full blocks of a prompt prefix some earlier sequence computed (or pulled).  A
block's hash chains its parent's, so equal hashes mean equal prefixes.  Freed blocks keep their hash
and contents until reused, so a later request can still hit them.  Must not touch: the cache tensors.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence as Seq

import numpy as np
import xxhash

from kvrelay.engines.reference.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    token_ids: list[int] = field(default_factory=list)


def salt_seed(salt: str) -> bytes | None:
    """The parent hash of a sequence's first block: None unsalted, else the salt's hash (a tenant's prompts
    never share this cache's blocks with another tenant's: no hit, no time difference to observe)."""
    return xxhash.xxh3_128_digest(f"salt|{salt}".encode()) if salt else None


def chain_hash(token_ids: Seq[int], parent: bytes | None) -> bytes:
    h = xxhash.xxh3_128()
    if parent is not None:
        h.update(parent)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"BlockManager needs positive num_blocks/block_size, got {num_blocks}/{block_size}")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: deque[int] = deque(range(num_blocks))
        self.hash_to_block: dict[bytes, int] = {}
        self.hits = 0  # prompt blocks served from the prefix cache
        self.events: Any = None  # kvrelay.events.engine.DeviceEvents: told each hash entering/leaving the map
        self.queries = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    def _take(self, block_id: int) -> Block:
        b = self.blocks[block_id]
        if b.ref_count:
            raise RuntimeError(f"block {block_id} is still referenced ({b.ref_count})")
        if b.hash is not None and self.hash_to_block.get(b.hash) == block_id:
            del self.hash_to_block[b.hash]
            if self.events is not None:
                self.events.removed(b.hash)
        b.hash, b.token_ids, b.ref_count = None, [], 1
        self.free.remove(block_id)
        return b

    def can_allocate(self, seq: Sequence) -> bool:
        return self.num_free >= seq.num_blocks(self.block_size)

    def allocate(self, seq: Sequence, cacheable_tokens: int | None = None, register: bool = True) -> None:
        """Give ``seq`` blocks for its current tokens, reusing cached full blocks of its prompt prefix.

        Only blocks lying entirely within the first ``cacheable_tokens`` tokens (default: all but the last
        prompt token, which must be computed to get logits) may be hits; ``seq.num_cached_tokens`` is set.
        ``register=False`` leaves the new blocks out of the prefix cache until `register()` (their KV
        arrives later, e.g. pulled).
        """
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.request_id} already holds blocks")
        bs = self.block_size
        limit = len(seq.prompt) - 1 if cacheable_tokens is None else cacheable_tokens
        need = seq.num_blocks(bs)
        if need > self.num_free:
            raise RuntimeError(f"need {need} blocks, {self.num_free} free")
        tokens = seq.tokens
        parent = salt_seed(seq.cache_salt)
        cached = 0
        missed = False
        for i in range(need):
            ids = tokens[i * bs:(i + 1) * bs]
            full = len(ids) == bs
            h = chain_hash(ids, parent) if full else None
            block_id = self.hash_to_block.get(h, -1) if h is not None else -1
            hit = (not missed and block_id >= 0 and (i + 1) * bs <= limit
                   and self.blocks[block_id].token_ids == ids)
            if full and (i + 1) * bs <= limit:
                self.queries += 1
            if hit:
                b = self.blocks[block_id]
                if b.ref_count == 0:
                    self.free.remove(block_id)
                b.ref_count += 1
                cached += bs
                self.hits += 1
            else:
                missed = True
                b = self._take(self.free[0])
                if h is not None and register:
                    # registered now; its KV is valid once this step computes (or pulls) it
                    b.hash, b.token_ids = h, list(ids)
                    self.hash_to_block[h] = b.block_id
                    if self.events is not None:
                        self.events.stored(h, parent, tokens, i, seq.cache_salt)
            seq.block_table.append(b.block_id)
            parent = h
        seq.num_cached_tokens = cached
        seq.num_computed = cached

    def register(self, seq: Sequence, num_tokens: int) -> None:
        """Enter ``seq``'s full blocks within its first ``num_tokens`` tokens into the prefix cache."""
        bs = self.block_size
        tokens = seq.tokens
        parent = salt_seed(seq.cache_salt)
        for i in range(num_tokens // bs):
            ids = tokens[i * bs:(i + 1) * bs]
            b = self.blocks[seq.block_table[i]]
            h = chain_hash(ids, parent)
            if b.hash is None:
                b.hash, b.token_ids = h, list(ids)
                if self.hash_to_block.setdefault(h, b.block_id) == b.block_id and self.events is not None:
                    self.events.stored(h, parent, tokens, i, seq.cache_salt)
            parent = h

    def free_seq(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            b = self.blocks[block_id]
            b.ref_count -= 1
            if b.ref_count == 0:
                self.free.append(block_id)
        seq.block_table = []

    def forget(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks, dropping from the prefix cache those past its cache hits (their KV never
        became valid)."""
        for block_id in seq.block_table[seq.num_cached_tokens // self.block_size:]:
            b = self.blocks[block_id]
            if b.ref_count == 1 and b.hash is not None and self.hash_to_block.get(b.hash) == block_id:
                del self.hash_to_block[b.hash]
                if self.events is not None:
                    self.events.removed(b.hash)
                b.hash, b.token_ids = None, []
        self.free_seq(seq)

    def can_append(self, seq: Sequence) -> bool:
        return len(seq) % self.block_size != 1 or self.num_free >= 1

    def may_append(self, seq: Sequence) -> None:
        """Called after a token was appended to ``seq``: add a block when it starts a new one, and
        register the hash of a block it just filled."""
        bs = self.block_size
        n = len(seq)
        if n % bs == 1 and len(seq.block_table) < seq.num_blocks(bs):
            seq.block_table.append(self._take(self.free[0]).block_id)
        elif n % bs == 0:
            last = self.blocks[seq.block_table[-1]]
            if last.hash is None:
                ids = seq.tokens[n - bs:n]
                parent = self.blocks[seq.block_table[-2]].hash if len(seq.block_table) > 1 else \
                    salt_seed(seq.cache_salt)
                if parent is not None or len(seq.block_table) == 1:
                    h = chain_hash(ids, parent)
                    last.hash, last.token_ids = h, ids
                    if self.hash_to_block.setdefault(h, last.block_id) == last.block_id and self.events is not None:
                        self.events.stored(h, parent, seq.tokens, n // bs - 1, seq.cache_salt)
