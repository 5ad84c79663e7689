"""Helpers of the KV-event tests (also used by tests/security): a publisher's owner."""

from __future__ import annotations

import threading

from kvrelay.events import wire as w
from kvrelay.events.publisher import EventPublisher


class Owner:
    """What a publisher's owner holds: hashes in one medium, under one lock, with a snapshot."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.held: dict[int, list[int]] = {}
        self.pub: EventPublisher | None = None

    def store(self, h: int, tokens: list[int]) -> int | None:
        with self.lock:
            self.held[h] = tokens
            assert self.pub is not None
            return self.pub.publish([w.stored([h], None, tokens, len(tokens), w.MEDIUM_CPU_TIER1)])

    def remove(self, h: int) -> None:
        with self.lock:
            del self.held[h]
            assert self.pub is not None
            self.pub.publish([w.BlockRemoved(block_hashes=[h], medium=w.MEDIUM_CPU_TIER1)])

    def snapshot(self) -> list[w.Event]:
        return [w.stored([h], None, t, len(t), w.MEDIUM_CPU_TIER1) for h, t in self.held.items()]
