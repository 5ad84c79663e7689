"""The router's index of who holds which KV blocks: per source (a worker's URL, ``store``, or with a store on every
host each store's control address), block -> tiers.

It is fed by KV events (vLLM's wire format, `kvrelay.events`): ``BlockStored`` carries the token ids
of its blocks, so the index names each block by its own hash chain over those tokens (xxh3-64 of the
parent's hash and the block's token ids as int64), the chain `prompt_hashes` computes for a request's
prompt.  The publishers' hashes (engine hashes, store hashes: whatever each publisher uses) are kept only
to map a later ``BlockRemoved`` or a child's ``parent_block_hash`` back to the index's names (Dynamo's
router does the same: it never needs to recompute a publisher's hash, only its token blocks).  Each
source may use its own block size (an engine's paged block, the store's chunk); a request is hashed
once per block size in use.

Tiers, by the events' ``medium``: ``device`` (GPU: an engine's own paged cache, also the reference
engine's on CPU), ``host`` (CPU, CPU_TIER1: the store's memory pool), ``disk`` (DISK: its SSD tier).

A worker whose events the router does not follow can still be scored: ``record`` notes what the router
itself sent there (SGLang's approximate cache-aware routing): the prompt's blocks, as ``device`` blocks of
that worker, forgotten least recently used first beyond ``approx_blocks`` per worker (the engine evicts
too, unseen).  Only events ever vouch for the store (a shortcut past the prefill leg needs certainty).

Thread-safety: the subscribers' threads apply batches and the router's loop reads matches; one lock.

Owns: `KVIndex`, `prompt_hashes`, the medium -> tier map.  Must not touch: sockets (the subscribers,
kvrelay.events) or routing decisions (policy.py).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import xxhash

from kvrelay.events.wire import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch, salt_of

TIERS = ("device", "host", "disk")
MEDIUM_TIER = {None: "device", "GPU": "device", "CPU": "host", "CPU_TIER1": "host", "DISK": "disk"}
ROOT = 0  # the chain's seed: the parent of a prompt's first block (no tenant)


def root(salt: str = "") -> int:
    """The chain's seed for a tenant: a prompt's blocks under one cache_salt never share a name with the same
    tokens under another (or none), as in the publishers' own hashes and vLLM's (the salt is in the first
    block's extra keys, `kvrelay.events.wire.salt_of`)."""
    return ROOT if not salt else xxhash.xxh3_64_intdigest(b"kvrelay-salt|" + salt.encode())


def chain(tokens: Sequence[int], block_size: int, parent: int = ROOT) -> list[int]:
    """The index's hash of each block of ``tokens``, a trailing partial block included (the store keeps a
    prompt's last, partial chunk; engines publish full blocks only, so theirs never matches)."""
    if block_size <= 0:
        raise ValueError(f"block size must be positive, got {block_size}")
    arr = np.asarray(tokens, dtype=np.int64)
    out: list[int] = []
    for start in range(0, len(arr), block_size):
        parent = xxhash.xxh3_64_intdigest(parent.to_bytes(8, "little") + arr[start:start + block_size].tobytes())
        out.append(parent)
    return out


def prompt_hashes(tokens: Sequence[int], block_sizes: Sequence[int], salt: str = "") -> dict[int, list[int]]:
    """The prompt's chain at each block size, seeded by the request's cache_salt."""
    seed = root(salt)
    return {bs: chain(tokens, bs, seed) for bs in block_sizes}


@dataclass(slots=True)
class _Source:
    blocks: dict[int, dict[str, int]] = field(default_factory=dict)  # index hash -> {tier: copies}
    names: dict[tuple[int | bytes, str], int] = field(default_factory=dict)  # (publisher hash, tier) -> index hash
    parents: dict[int | bytes, int] = field(default_factory=dict)  # publisher hash -> index hash (any tier)
    block_size: int = 0


@dataclass(slots=True)
class Match:
    """How much of a prompt one source holds: the blocks of its longest cached prefix by tier."""
    blocks: dict[str, int]
    block_size: int
    prompt_blocks: int  # blocks of the prompt at that block size (a trailing partial one included)

    def tokens(self, tier: str | None = None) -> int:
        n = sum(self.blocks.values()) if tier is None else self.blocks.get(tier, 0)
        return n * self.block_size


class KVIndex:
    def __init__(self, approx_block_size: int = 16, approx_blocks: int = 65536) -> None:
        if approx_block_size <= 0 or approx_blocks <= 0:
            raise ValueError(f"approximate index: block size {approx_block_size} and capacity {approx_blocks} "
                             f"blocks must be positive")
        self._lock = threading.Lock()
        self._sources: dict[str, _Source] = {}
        self.approx_block_size, self.approx_blocks = approx_block_size, approx_blocks
        self._approx: dict[str, OrderedDict[int, None]] = {}  # source -> its recorded blocks, LRU first
        self.orphans = 0  # stored blocks whose parent the index did not know (skipped)
        self.malformed = 0  # BlockStored events whose token ids do not match their blocks (skipped)
        self.events = 0

    def block_sizes(self) -> list[int]:
        with self._lock:
            sizes = {s.block_size for s in self._sources.values() if s.block_size}
            return sorted(sizes | ({self.approx_block_size} if self._approx else set()))

    def record(self, source: str, hashes: dict[int, list[int]]) -> None:
        """The router sent a prompt (``prompt_hashes``, at ``approx_block_size``) to ``source``, a worker whose
        events it does not follow: count its blocks as held there, until ``approx_blocks`` newer ones push
        them out."""
        chain_ = hashes.get(self.approx_block_size)
        if not chain_:
            return
        with self._lock:
            lru = self._approx.setdefault(source, OrderedDict())
            for h in chain_:
                lru[h] = None
                lru.move_to_end(h)
            while len(lru) > self.approx_blocks:
                lru.popitem(last=False)

    def clear(self, source: str) -> None:
        """Forget everything known about ``source`` (its publisher restarted, or a resync follows)."""
        with self._lock:
            self._sources[source] = _Source()

    def apply(self, source: str, batch: KVEventBatch) -> None:
        with self._lock:
            src = self._sources.setdefault(source, _Source())
            for ev in batch.events:
                self.events += 1
                if isinstance(ev, BlockStored):
                    self._stored(src, ev)
                elif isinstance(ev, BlockRemoved):
                    self._removed(src, ev)
                elif isinstance(ev, AllBlocksCleared):
                    self._sources[source] = src = _Source()

    def _stored(self, src: _Source, ev: BlockStored) -> None:
        tier = MEDIUM_TIER.get(ev.medium, "host")
        if ev.block_size <= 0 or -(-len(ev.token_ids) // ev.block_size) != len(ev.block_hashes):
            self.malformed += 1  # token ids that do not fill its blocks: cannot be named
            return
        src.block_size = ev.block_size
        if ev.parent_block_hash is None:
            parent = root(salt_of(ev))
        elif (found := src.parents.get(ev.parent_block_hash)) is not None:
            parent = found
        else:
            self.orphans += len(ev.block_hashes)
            return
        for ext, h in zip(ev.block_hashes, chain(ev.token_ids, ev.block_size, parent), strict=True):
            k = ext
            if (k, tier) not in src.names:
                src.names[(k, tier)] = h
                tiers = src.blocks.setdefault(h, {})
                tiers[tier] = tiers.get(tier, 0) + 1
            src.parents[k] = h

    def _removed(self, src: _Source, ev: BlockRemoved) -> None:
        tier = MEDIUM_TIER.get(ev.medium, "host")
        for ext in ev.block_hashes:
            k = ext
            h = src.names.pop((k, tier), None)
            if h is None:
                continue
            tiers = src.blocks.get(h, {})
            if tiers.get(tier, 0) <= 1:
                tiers.pop(tier, None)
            else:
                tiers[tier] -= 1
            if not tiers:
                src.blocks.pop(h, None)
            if not any((k, t) in src.names for t in TIERS):
                src.parents.pop(k, None)

    def match(self, source: str, hashes: dict[int, list[int]]) -> Match:
        """The longest prefix of the prompt (``prompt_hashes``) that ``source`` holds, its blocks by best tier."""
        with self._lock:
            src = self._sources.get(source)
            if src is None or not src.block_size:
                lru = self._approx.get(source)
                if lru is None:
                    return Match({}, 1, 0)
                approx = hashes.get(self.approx_block_size, [])
                n = next((i for i, h in enumerate(approx) if h not in lru), len(approx))
                return Match({"device": n} if n else {}, self.approx_block_size, len(approx))
            chain_ = hashes.get(src.block_size, [])
            found: dict[str, int] = {}
            for h in chain_:
                tiers = src.blocks.get(h)
                if not tiers:
                    break
                best = next(t for t in TIERS if t in tiers)
                found[best] = found.get(best, 0) + 1
            return Match(found, src.block_size, len(chain_))

    def stats(self) -> dict[str, int]:
        with self._lock:
            out = {f"blocks_{name}": len(s.blocks) for name, s in self._sources.items()}
            out.update({f"blocks_{name}": len(lru) for name, lru in self._approx.items() if name not in out})
        return {**out, "orphans": self.orphans, "malformed": self.malformed, "events": self.events}
