"""What each request id's publisher reserved, so that a pull that can never be served fails at once.

A decode leg pulls the chunks of its own prompt under the request id the router gave both legs.  If that
id's prefill publishes another prompt's chunks (a client that reused an id, a router bug, a prefill and a
decode that disagree on the model or the chunk size, so that the content addresses differ), the pull used to
wait its whole deadline (30 s in the vLLM connector) before the decode recomputed.  The store can tell at
once: the publisher reserved chunks under that id and none of them is a chunk of the pull.  Chunks are
compared by content address (``block_hash``), not layer, so a prefill whose ranks reserve their own heads
still matches.  Heads: a prefill and a decode that cut the KV heads into other slices (tensor parallelism,
kvrelay.connector.heads) can never meet either: one cut's ranges are equal or disjoint, so a pulled range
that overlaps a reserved one without being equal to it fails at once (a disjoint one may come from another
prefill rank that has not reserved yet).

Owns: `RequestChunks` (request id -> the content addresses it reserved, kept ``ttl`` seconds after the last
reservation, at most ``capacity`` ids) and the mismatch rule.  Must not touch: waiters or replies (the
server's), storage (the core's).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from kvrelay.keys import ChunkKey

TTL_S = 120.0  # as long as an abort is remembered: longer than any prefill's publish
CAPACITY = 65536  # request ids remembered (the oldest forgotten first); a few hundred bytes each


class RequestChunks:
    def __init__(self, ttl: float = TTL_S, capacity: int = CAPACITY) -> None:
        if ttl <= 0 or capacity <= 0:
            raise ValueError(f"RequestChunks needs a positive ttl and capacity, got {ttl}, {capacity}")
        self.ttl, self.capacity = ttl, capacity
        # request id -> (content addresses, head ranges, expiry)
        self._ids: OrderedDict[str, tuple[set[str], set[tuple[int, int]], float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._ids)

    def reserved(self, request_id: str, keys: Iterable[ChunkKey], now: float) -> None:
        """``request_id``'s publisher reserved ``keys`` (every reservation of a request adds to its set)."""
        if not request_id:
            return
        entry = self._ids.pop(request_id, None)
        hashes, heads = (entry[0], entry[1]) if entry is not None else (set(), set())
        for k in keys:
            hashes.add(k.block_hash)
            if k.head_end > k.head_start:  # (not a first-token record)
                heads.add((k.head_start, k.head_end))
        self._ids[request_id] = (hashes, heads, now + self.ttl)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def mismatch(self, request_id: str, keys: Iterable[ChunkKey], now: float) -> str | None:
        """Why a pull of ``keys`` under ``request_id`` can never be served by that request's publisher, or
        None (unknown id, expired, or at least one chunk in common: the pull may wait)."""
        entry = self._ids.get(request_id) if request_id else None
        if entry is None or entry[2] <= now:
            return None
        wanted = {k.block_hash for k in keys}
        if wanted and wanted & entry[0]:
            cut = sorted(entry[1])
            for k in keys:
                if any(k.head_start < b and a < k.head_end and (a, b) != (k.head_start, k.head_end) for a, b in cut):
                    return (f"request {request_id}'s publisher cut the KV heads into {cut}, and this pull asks for "
                            f"heads [{k.head_start}, {k.head_end}): prefill and decode slice the heads differently "
                            f"(tensor parallelism), so these chunks will not come; give every server the same "
                            f"kv_connector_extra_config.head_slices; recompute")
            return None
        if not wanted:
            return None
        return (f"request {request_id}'s publisher reserved {len(entry[0])} chunk(s), none of the {len(wanted)} this "
                f"pull waits for: it publishes another prompt (or another model, compat hash or chunk size) under "
                f"that id, so these chunks will not come; recompute")

    def sweep(self, now: float) -> None:
        """Forget expired ids: every reservation moves its id to the end with a fresh expiry, so the ids run
        in expiry order and the sweep stops at the first live one."""
        while self._ids:
            rid, (_, _, exp) = next(iter(self._ids.items()))
            if exp > now:
                return
            del self._ids[rid]
