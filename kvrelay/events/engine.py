"""`DeviceEvents`: an engine's KV events for its own paged cache (medium ``GPU``: Dynamo's device tier).

The reference engine's `BlockManager` calls `stored` when a full block's hash enters its prefix cache and
`removed` when it leaves (the block is reused for other tokens, or its KV never became valid): the events
say exactly what the prefix cache can hit.  The reference engine runs on CPU; its cache is still the
engine's device tier, so it publishes ``GPU``, as vLLM's CPU build does.  An engine block of ``S`` tokens
is described as ``S/B`` event blocks of the consumer's size ``B`` (``B`` must divide ``S``), hashed as in
`kvrelay.events.hashing` with the engine's compat hash and the request's cache_salt, so the same prefix
has the same hashes in the store's events.

Owns: the map from the engine's block hashes to event hashes, under its own lock (the publisher's
``state_lock``: snapshots agree with the stream).  Must not touch: the block manager's state.
"""

from __future__ import annotations

import threading
from typing import Sequence

from kvrelay.events.hashing import chain
from kvrelay.events.publisher import DEFAULT_ENDPOINT, EventPublisher
from kvrelay.events.wire import MEDIUM_GPU, BlockRemoved, Event, stored


class DeviceEvents:
    def __init__(self, engine_block_size: int, compat_hash: str, *, block_size: int | None = None,
                 endpoint: str = DEFAULT_ENDPOINT, replay_endpoint: str | None = DEFAULT_ENDPOINT,
                 topic: str = "", medium: str = MEDIUM_GPU) -> None:
        bs = block_size or engine_block_size
        if bs <= 0 or engine_block_size % bs:
            raise ValueError(f"--events-block-size {bs} must divide the engine's block size {engine_block_size}")
        self.engine_block_size, self.block_size = engine_block_size, bs
        self.compat_hash, self.medium = compat_hash, medium
        self.lock = threading.RLock()
        # engine block hash -> (event hashes, parent event hash, token ids, cache_salt)
        self._held: dict[bytes, tuple[list[int], int | None, list[int], str]] = {}
        self.publisher = EventPublisher(endpoint, replay_endpoint, topic, snapshot=self.snapshot,
                                        state_lock=self.lock).start()

    def stored(self, h: bytes, parent: bytes | None, tokens: Sequence[int], index: int, salt: str) -> None:
        """Block ``index`` of a sequence whose tokens are ``tokens`` entered the prefix cache as ``h``."""
        sb = self.engine_block_size
        ids = list(tokens[index * sb:(index + 1) * sb])
        with self.lock:
            if h in self._held:
                return
            up = self._held.get(parent) if parent is not None else None
            if index == 0:
                parent_ev = None
            elif up is not None:
                parent_ev = up[0][-1]
            else:  # the parent block left the cache meanwhile: hash the prefix again
                parent_ev = chain(tokens[:index * sb], self.block_size, self.compat_hash, salt)[-1]
            hashes = chain(ids, self.block_size, self.compat_hash, salt, parent=parent_ev, start=index * sb)
            self._held[h] = (hashes, parent_ev, ids, salt)
            self.publisher.publish([stored(hashes, parent_ev, ids, self.block_size, self.medium, salt)])

    def removed(self, h: bytes) -> None:
        with self.lock:
            held = self._held.pop(h, None)
            if held is not None:
                self.publisher.publish([BlockRemoved(block_hashes=list(held[0]), medium=self.medium)])

    def snapshot(self) -> list[Event]:
        with self.lock:
            return [stored(hs, p, ids, self.block_size, self.medium, salt) for hs, p, ids, salt in self._held.values()]

    def addresses(self) -> dict[str, str | None]:
        return {"events": self.publisher.endpoint, "events_replay": self.publisher.replay_endpoint}

    def close(self) -> None:
        self.publisher.close()
