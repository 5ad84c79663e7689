"""Block hashes of KV events: a chain over ``block_size``-token blocks, as unsigned 64-bit ints.

    h[-1] = xxh3_64("kvrelay-events|<compat hash>|<tenant>")
    h[j]  = xxh3_64(h[j-1] as 8 bytes big-endian || token ids of block j as int64 little-endian)

So a block's hash names the model and layout (the compat hash), the tenant (the request's cache_salt)
and every token before and in it, like the store's chunk addresses (`kvrelay.keys.block_hashes`) but at
the consumer's block size: a store chunk of ``chunk_tokens`` tokens starting at token ``s`` is described
by the event blocks ``s/B .. (s + chunk_tokens)/B - 1`` (only whole blocks; ``chunk_tokens`` a multiple of
``B`` gives every chunk exactly ``chunk_tokens/B`` blocks).  The store and the engines hash alike, so a
router can match a prefix held by an engine's device tier and by the store.  (Dynamo recomputes its own
hashes from the token ids; these only have to be stable per block, which they are.)

Owns: the hash function.  Must not touch: anything else.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import xxhash


def root_hash(compat_hash: str, tenant: str = "") -> int:
    return xxhash.xxh3_64_intdigest(f"kvrelay-events|{compat_hash}|{tenant}".encode())


def chain(token_ids: Sequence[int], block_size: int, compat_hash: str, tenant: str = "",
          parent: int | None = None, start: int = 0) -> list[int]:
    """Hashes of the whole blocks of ``token_ids`` (the tokens from position ``start`` of a prompt,
    ``start`` a multiple of ``block_size``; ``parent``: the hash of the block before, None at 0)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if start % block_size:
        raise ValueError(f"start {start} is not a multiple of block_size {block_size}")
    tokens = np.asarray(token_ids, dtype="<i8")
    h = root_hash(compat_hash, tenant) if parent is None else parent
    out: list[int] = []
    for b in range(0, len(tokens) - block_size + 1, block_size):
        h = xxhash.xxh3_64_intdigest(h.to_bytes(8, "big") + tokens[b:b + block_size].tobytes())
        out.append(h)
    return out
