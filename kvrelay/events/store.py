"""`StoreEvents`: the store's KV events, from its index's tier changes (hooks in `kvrelay.store.index`).

What the store announces: a *group* is one chunk address (a chunk hash and head range) over all its
layers.  It is stored in ``CPU_TIER1`` while every layer is ready in the host-memory pool, and in ``DISK``
while every layer is on the SSD tier; each medium is announced on its own, so a spill is a ``BlockStored``
in ``DISK`` (the chunk is then in both) and the later eviction from memory a ``BlockRemoved`` in
``CPU_TIER1``; leaving the last tier removes it everywhere.  A group is described at the consumer's block
size (`kvrelay.events.hashing`: the whole blocks inside the chunk's token range, hashes chained from the
prompt's first token), with the token ids the publishing client sent with its reservation
(``Reserve.tokens``).  A chunk reserved without tokens (an older client) is never announced (counted).

Restarts: each group's description is appended to ``<ssd_dir>/kv-events.log`` when first announced, so
after a restart the groups recovered whole from the SSD are announced again: the publisher's seq 0 is
``[AllBlocksCleared, BlockStored(DISK) ...]`` and a reconnecting subscriber resyncs from a snapshot.

Every method runs under the store's lock (the index's caller holds it); publishing never blocks.

Owns: the group bookkeeping and the description log.  Must not touch: the index's own state.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import msgspec

from kvrelay.events.hashing import chain
from kvrelay.events.publisher import EventPublisher
from kvrelay.events.wire import MEDIUM_CPU_TIER1, MEDIUM_DISK, BlockRemoved, Event, stored

log = logging.getLogger(__name__)

LOG_NAME = "kv-events.log"
GroupKey = tuple[str, int, int]  # (chunk hash, head_start, head_end)


class Described(msgspec.Struct, array_like=True):
    """A group at one block size: what its BlockStored says (one record of the description log)."""
    block_hash: str
    head_start: int
    head_end: int
    layers: int
    block_size: int
    hashes: list[int]
    parent: int | None
    token_ids: list[int]
    tenant: str = ""  # the prompt's cache_salt (absent from logs written before it was recorded)


@dataclass(slots=True)
class _Prompt:
    tokens: list[int]
    namespace: str
    tenant: str
    hashes: list[int] | None = None  # the whole prompt's event hashes, computed on first use


@dataclass(slots=True)
class _Group:
    layers: int = 0  # how many layers make it whole (0: unknown, never announced)
    mem: set[int] = field(default_factory=set)  # layers ready in memory
    ssd: set[int] = field(default_factory=set)  # layers on SSD
    span: tuple[int, int] | None = None  # token range (from a chunk header)
    prompt: _Prompt | None = None
    desc: Described | None = None
    in_mem: bool = False
    in_ssd: bool = False


class StoreEvents:
    def __init__(self, block_size: int, state_dir: str = "") -> None:
        if block_size <= 0:
            raise ValueError(f"events block size must be positive, got {block_size}")
        self.block_size = block_size
        self.groups: dict[GroupKey, _Group] = {}
        self.publisher: EventPublisher | None = None
        self.counters = {"groups_untracked": 0, "events_stored": 0, "events_removed": 0}
        self._log_path = os.path.join(state_dir, LOG_NAME) if state_dir else ""
        self._log: Any = None
        if self._log_path:
            for d in self._read_log():
                if d.block_size == block_size:
                    self.groups[(d.block_hash, d.head_start, d.head_end)] = _Group(layers=d.layers, desc=d)

    # -- the description log ---------------------------------------------------------------------------

    def _read_log(self) -> list[Described]:
        try:
            with open(self._log_path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return []
        dec = msgspec.msgpack.Decoder(Described)
        out, pos = [], 0
        while pos + 4 <= len(data):
            n = int.from_bytes(data[pos:pos + 4], "little")
            if pos + 4 + n > len(data):
                break  # a torn last record (crash while appending)
            try:
                out.append(dec.decode(data[pos + 4:pos + 4 + n]))
            except msgspec.DecodeError:
                break
            pos += 4 + n
        return out

    def _append(self, d: Described) -> None:
        if self._log is None:
            return
        payload = msgspec.msgpack.encode(d)
        self._log.write(len(payload).to_bytes(4, "little") + payload)
        self._log.flush()

    def attach(self, publisher: EventPublisher) -> None:
        """After SSD recovery: keep only groups that survived, rewrite the log with them, start announcing."""
        for k in [k for k, g in self.groups.items() if not g.mem and not g.ssd]:
            del self.groups[k]
        if self._log_path:
            tmp = self._log_path + ".tmp"
            with open(tmp, "wb") as fh:
                for g in self.groups.values():
                    if g.desc is not None:
                        p = msgspec.msgpack.encode(g.desc)
                        fh.write(len(p).to_bytes(4, "little") + p)
            os.replace(tmp, self._log_path)
            self._log = open(self._log_path, "ab")
        self.publisher = publisher

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    # -- from the store ---------------------------------------------------------------------------------

    def reserved(self, keys: Sequence[Any], tokens: Sequence[int], namespace: str, tenant: str) -> None:
        """A reservation (``keys``: ChunkKeys) of a prompt's ``tokens``: how many layers make each group whole."""
        layers: dict[GroupKey, set[int]] = {}
        for k in keys:
            if k.layer >= 0:
                layers.setdefault((k.block_hash, k.head_start, k.head_end), set()).add(k.layer)
        prompt = _Prompt(list(tokens), namespace, tenant) if tokens else None
        for gk, ls in layers.items():
            g = self.groups.setdefault(gk, _Group())
            if g.desc is not None:
                continue
            g.layers = max(g.layers, max(ls) + 1)
            if prompt is not None:
                g.prompt = prompt
                self._update(gk, g)

    def memory(self, e: Any, had: bool, has: bool) -> None:
        """A ready chunk (index `Entry`) gained (``has``) or lost its in-memory copy."""
        self._change(e, "mem", had, has)

    def ssd(self, e: Any, had: bool, has: bool) -> None:
        self._change(e, "ssd", had, has)

    def removed(self, e: Any, was_ready: bool) -> None:
        k = e.key
        if k.layer < 0:
            return
        gk = (k.block_hash, k.head_start, k.head_end)
        g = self.groups.get(gk)
        if g is None:
            return
        if was_ready:
            g.mem.discard(k.layer)
            g.ssd.discard(k.layer)
            self._update(gk, g)
        if not g.mem and not g.ssd:
            del self.groups[gk]

    def _change(self, e: Any, tier: str, had: bool, has: bool) -> None:
        k = e.key
        if k.layer < 0 or had == has:
            return
        gk = (k.block_hash, k.head_start, k.head_end)
        g = self.groups.setdefault(gk, _Group())
        if g.span is None and e.header is not None:
            g.span = (e.header.token_start, e.header.token_end)
        layers = g.mem if tier == "mem" else g.ssd
        (layers.add if has else layers.discard)(k.layer)
        self._update(gk, g)

    def _update(self, gk: GroupKey, g: _Group) -> None:
        whole_mem = g.layers > 0 and len(g.mem) >= g.layers
        whole_ssd = g.layers > 0 and len(g.ssd) >= g.layers
        if (whole_mem or whole_ssd) and g.desc is None and not self._describe(gk, g):
            return
        events: list[Event] = []
        for now, was, medium in ((whole_mem, g.in_mem, MEDIUM_CPU_TIER1), (whole_ssd, g.in_ssd, MEDIUM_DISK)):
            if now == was:
                continue
            d = g.desc
            assert d is not None
            if now:
                events.append(stored(d.hashes, d.parent, d.token_ids, d.block_size, medium, d.tenant))
                self.counters["events_stored"] += 1
            else:
                events.append(BlockRemoved(block_hashes=list(d.hashes), medium=medium))
                self.counters["events_removed"] += 1
        g.in_mem, g.in_ssd = whole_mem, whole_ssd
        if events and self.publisher is not None and g.desc is not None and g.desc.hashes:
            self.publisher.publish(events)

    def _describe(self, gk: GroupKey, g: _Group) -> bool:
        p = g.prompt
        if p is None or g.span is None:
            if p is None:
                self.counters["groups_untracked"] += 1
            return False
        bs = self.block_size
        if p.hashes is None:
            p.hashes = chain(p.tokens, bs, p.namespace, p.tenant)
        start, end = g.span
        first, last = -(-start // bs), min(end, len(p.tokens)) // bs  # whole blocks inside [start, end)
        g.desc = Described(gk[0], gk[1], gk[2], g.layers, bs, p.hashes[first:last],
                           p.hashes[first - 1] if first > 0 else None, p.tokens[first * bs:last * bs], p.tenant)
        g.prompt = None
        self._append(g.desc)
        return True

    def snapshot(self) -> list[Event]:
        """Everything held, as BlockStored events (the publisher calls it under the store's lock)."""
        out: list[Event] = []
        for g in self.groups.values():
            d = g.desc
            if d is None or not d.hashes:
                continue
            for flag, medium in ((g.in_mem, MEDIUM_CPU_TIER1), (g.in_ssd, MEDIUM_DISK)):
                if flag:
                    out.append(stored(d.hashes, d.parent, d.token_ids, d.block_size, medium, d.tenant))
        return out


def start_publisher(events: StoreEvents, cfg: Any, lock: Any) -> EventPublisher:
    """The store daemon's publisher (``cfg``: its StoreConfig), started after SSD recovery: seq 0 announces
    what survived.  ``lock``: the store's lock, under which every index change (and so every event) happens."""
    pub = EventPublisher(cfg.events, cfg.events_replay or None, cfg.events_topic, snapshot=events.snapshot,
                         state_lock=lock)
    try:
        with lock:
            events.attach(pub)
        pub.start()
    except BaseException:
        pub.close()
        raise
    log.info("KV events on %s (replay %s, block size %d, topic %r)", pub.endpoint, pub.replay_endpoint,
             events.block_size, cfg.events_topic)
    return pub


def events_stats(publisher: EventPublisher | None, events: StoreEvents | None) -> dict[str, int]:
    """The store's "events" stats: the publisher's counters and the group bookkeeping ({} without --events)."""
    if publisher is None or events is None:
        return {}
    return {**publisher.stats(), **events.counters, "event_groups": len(events.groups)}
