"""`EventView`: what each publisher holds, rebuilt from its KV events (a consumer for tests and tools).

Pass ``view.on_batch`` and ``view.on_resync`` to an `EventSubscriber`.  The view keeps, per source and
medium, the set of block hashes stored and not removed, and each block's token ids and parent; a batch's
``AllBlocksCleared`` empties the source (every medium), as does a resync.  Thread-safe.

Owns: the per-source block sets.  Must not touch: sockets.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Callable

from kvrelay.events.wire import AllBlocksCleared, BlockHash, BlockRemoved, BlockStored, KVEventBatch


class EventView:
    def __init__(self) -> None:
        self._lock = threading.RLock()  # re-entered by wait_for's predicate
        self._blocks: dict[str, dict[str | None, dict[BlockHash, tuple[BlockHash | None, tuple[int, ...]]]]] = \
            defaultdict(lambda: defaultdict(dict))
        self.batches: dict[str, int] = defaultdict(int)
        self.resyncs: dict[str, int] = defaultdict(int)
        self.changed = threading.Condition(self._lock)

    def on_resync(self, source: str) -> None:
        with self._lock:
            self._blocks.pop(source, None)
            self.resyncs[source] += 1
            self.changed.notify_all()

    def on_batch(self, source: str, seq: int, batch: KVEventBatch) -> None:
        with self._lock:
            media = self._blocks[source]
            for ev in batch.events:
                if isinstance(ev, AllBlocksCleared):
                    media.clear()
                elif isinstance(ev, BlockStored):
                    bs = ev.block_size
                    parent = ev.parent_block_hash
                    for i, h in enumerate(ev.block_hashes):
                        media[ev.medium][h] = (parent, tuple(ev.token_ids[i * bs:(i + 1) * bs]))
                        parent = h
                elif isinstance(ev, BlockRemoved):
                    held = media[ev.medium]
                    for h in ev.block_hashes:
                        held.pop(h, None)
            self.batches[source] += 1
            self.changed.notify_all()

    def blocks(self, source: str, medium: str | None) -> dict[BlockHash, tuple[BlockHash | None, tuple[int, ...]]]:
        """{hash: (parent hash, token ids)} that ``source`` holds in ``medium``."""
        with self._lock:
            return dict(self._blocks.get(source, {}).get(medium, {}))

    def hashes(self, source: str, medium: str | None) -> set[BlockHash]:
        with self._lock:
            return set(self._blocks.get(source, {}).get(medium, {}))

    def wait_for(self, predicate: Callable[["EventView"], object], timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until ``predicate(self)`` holds; whether it did."""
        with self.changed:
            return bool(self.changed.wait_for(lambda: predicate(self), timeout))
