"""What each request id's publisher reserved, so that a pull that can never be served fails at once.

A decode leg pulls the chunks of its own prompt under the request id the router gave both legs.  If that
id's prefill publishes another prompt's chunks (a client that reused an id, a router bug, a prefill and a
decode that disagree on the model or the chunk size, so that the content addresses differ), the pull used to
wait its whole deadline (30 s in the vLLM connector) before the decode recomputed.  The store can tell at
once: the publisher reserved chunks under that id and none of them is a chunk of the pull.  Chunks are
compared by content address only (``block_hash``), not layer or heads, so a prefill and a decode with other
tensor-parallel head splits still match.

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
        self._ids: OrderedDict[str, tuple[set[str], float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._ids)

    def reserved(self, request_id: str, keys: Iterable[ChunkKey], now: float) -> None:
        """``request_id``'s publisher reserved ``keys`` (every reservation of a request adds to its set)."""
        if not request_id:
            return
        entry = self._ids.pop(request_id, None)
        hashes = entry[0] if entry is not None else set()
        hashes.update(k.block_hash for k in keys)
        self._ids[request_id] = (hashes, now + self.ttl)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def mismatch(self, request_id: str, keys: Iterable[ChunkKey], now: float) -> str | None:
        """Why a pull of ``keys`` under ``request_id`` can never be served by that request's publisher, or
        None (unknown id, expired, or at least one chunk in common: the pull may wait)."""
        entry = self._ids.get(request_id) if request_id else None
        if entry is None or entry[1] <= now:
            return None
        wanted = {k.block_hash for k in keys}
        if not wanted or wanted & entry[0]:
            return None
        return (f"request {request_id}'s publisher reserved {len(entry[0])} chunk(s), none of the {len(wanted)} this "
                f"pull waits for: it publishes another prompt (or another model, compat hash or chunk size) under "
                f"that id, so these chunks will not come; recompute")

    def sweep(self, now: float) -> None:
        """Forget expired ids: every reservation moves its id to the end with a fresh expiry, so the ids run
        in expiry order and the sweep stops at the first live one."""
        while self._ids:
            rid, (_, exp) = next(iter(self._ids.items()))
            if exp > now:
                return
            del self._ids[rid]
