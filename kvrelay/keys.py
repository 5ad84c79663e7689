"""Content addresses: the prefix hash chain over token blocks, and chunk keys.

A chunk holds one layer's KV for ``chunk_tokens`` consecutive tokens of a prompt (the last chunk of a
prompt may be partial).  Its block hash chains the hash of everything before it, so equal hashes mean
equal prefixes; the chain is seeded with the model id and the layout compatibility hash so different
models or dtypes never collide.  A request's ``cache_salt`` (vLLM's name; kvrelay's tenant id) enters the
seed too, so two tenants' equal prompts get unrelated addresses: one tenant can neither hit nor probe another's
chunks (an empty salt is the shared, unsalted address space, the same hashes as before salts existed).
A chunk key adds the layer and the head range; `kid_of` is its string
form, the id the store indexes it by (client and daemon alike, so it lives here and not in the daemon).

Owns: hashing and key ids.  Must not touch: storage or transfer.
"""

from __future__ import annotations

from typing import Sequence

import msgspec
import numpy as np
import xxhash

DEFAULT_CHUNK_TOKENS = 256


MAX_SALT_CHARS = 256


def check_salt(salt: object) -> str:
    """A request's ``cache_salt`` as the address takes it: a string of 1..MAX_SALT_CHARS printable characters
    (None: no salt, ""); ValueError naming the problem otherwise."""
    if salt is None:
        return ""
    if not isinstance(salt, str) or not salt or len(salt) > MAX_SALT_CHARS or not salt.isprintable():
        raise ValueError(f"cache_salt must be a non-empty string of at most {MAX_SALT_CHARS} printable characters, "
                         f"got {salt!r:.80}")
    return salt


def block_hashes(token_ids: Sequence[int], chunk_tokens: int, model_id: str, compat_hash: str,
                 salt: str = "") -> list[str]:
    """Hex hash chain, one entry per chunk of ``chunk_tokens`` tokens (a trailing partial chunk included),
    seeded with the model, the layout and the request's cache ``salt`` (its tenant; "" for none)."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    tokens = np.asarray(token_ids, dtype=np.int64)
    seed = f"kvrelay|{model_id}|{compat_hash}" + (f"|salt|{len(salt)}|{salt}" if salt else "")
    parent = xxhash.xxh3_128_digest(seed.encode())
    out: list[str] = []
    for start in range(0, len(tokens), chunk_tokens):
        h = xxhash.xxh3_128()
        h.update(parent)
        h.update(tokens[start:start + chunk_tokens].tobytes())
        parent = h.digest()
        out.append(parent.hex())
    return out


class ChunkKey(msgspec.Struct, frozen=True, array_like=True):
    block_hash: str  # hex, from block_hashes()
    layer: int
    head_start: int
    head_end: int

    def encode(self) -> bytes:
        return f"{self.block_hash}:{self.layer}:{self.head_start}:{self.head_end}".encode()


def kid_of(key: ChunkKey) -> str:
    """The key's id: ``key.encode()`` as a str (the store's index key, also what clients name chunks by)."""
    return f"{key.block_hash}:{key.layer}:{key.head_start}:{key.head_end}"


def chunk_keys(hashes: Sequence[str], layer: int, head_start: int, head_end: int) -> list[ChunkKey]:
    return [ChunkKey(h, layer, head_start, head_end) for h in hashes]
