"""Commit: a reserved chunk becomes ready, after (with ``verify``) its slot is re-hashed against the header's
checksum; every fresh chunk is queued for write-behind to SSD (publishers never wait for the disk).

Owns: `Commit` (the checks a commit must pass, verification without the lock, marking ready).  Must not
touch: admission, pins, the spiller (it only queues through tiering.py).
"""

from __future__ import annotations

from kvrelay.keys import ChunkKey, kid_of
from kvrelay.store.errors import OpError, StoreCode
from kvrelay.store.lifecycle import Busy, Entry
from kvrelay.store.shared import CoreState
from kvrelay.store.tiering import Tiering
from kvrelay.transfer.wire import ChunkHeader, checksum


class Commit:
    def __init__(self, st: CoreState, tiering: Tiering) -> None:
        self.st = st
        self.tiering = tiering

    def commit(self, key: ChunkKey, header: ChunkHeader, namespace: str, verify: bool = True) -> bool:
        """Check (and with ``verify``, re-hash the slot: outside the lock) and mark ready; returns False if the
        chunk was already present (nothing to do)."""
        st = self.st
        kid = kid_of(key)
        with st.lock:
            e = self._committable(kid, header, namespace)
            if e is None or e.busy is Busy.VERIFYING:  # present, or a concurrent commit is verifying it
                return False
            if verify:
                e.begin(Busy.VERIFYING)  # neither evicted nor purged while hashed without the lock
        if verify:
            try:
                got = checksum(st.pool.view[e.offset:e.offset + e.nbytes])
            finally:
                with st.lock:
                    e.end(Busy.VERIFYING)
            if got != header.checksum:
                with st.lock:
                    st.counters["checksum_failures"] += 1
                raise OpError(StoreCode.CORRUPT, f"commit of {kid}: checksum mismatch (header "
                                                 f"{header.checksum:#018x}, pool slot {got:#018x}); the slot was "
                                                 f"not fully written")
        with st.lock:
            if e.ready:  # a concurrent commit of the same content won
                return False
            st.ix.mark_ready(e, header, st.clock.monotonic(), verify)
            st.counters["commits"] += 1
            st.ix.book.count(e.tenant, "committed_bytes", e.nbytes)
        self.tiering.queue_spill([e])
        return True

    def commit_many(self, keys: list[ChunkKey], headers: list[ChunkHeader], namespace: str,
                    verify: bool) -> tuple[list[str], list[OpError]]:
        """`commit` for each chunk, each on its own; returns (kids committed fresh, refusals).  Without
        ``verify`` (nothing to hash) under one lock acquisition.  ``keys`` and ``headers`` pair up (the server
        refuses a request where their lengths differ)."""
        st = self.st
        refused: list[OpError] = []
        if verify:
            kids: list[str] = []
            for key, header in zip(keys, headers, strict=True):
                try:
                    if self.commit(key, header, namespace, verify=True):
                        kids.append(kid_of(key))
                except OpError as exc:
                    refused.append(exc)
            return kids, refused
        fresh: list[Entry] = []
        now = st.clock.monotonic()
        with st.lock:
            for key, header in zip(keys, headers, strict=True):
                kid = kid_of(key)
                try:
                    e = self._committable(kid, header, namespace)
                except OpError as exc:
                    refused.append(exc)
                    continue
                if e is None or e.busy is Busy.VERIFYING:
                    continue
                st.ix.mark_ready(e, header, now, False)
                st.ix.book.count(e.tenant, "committed_bytes", e.nbytes)
                fresh.append(e)
            st.counters["commits"] += len(fresh)
        self.tiering.queue_spill(fresh)
        return [e.kid for e in fresh], refused

    def _committable(self, kid: str, header: ChunkHeader, namespace: str) -> Entry | None:
        e = self.st.ix.get(kid)
        if e is None:
            raise OpError(StoreCode.NOT_FOUND, f"commit of {kid}: no reservation (it expired or was released); "
                                               f"reserve before publishing")
        if e.ready:
            return None
        if namespace and header.compat_hash != namespace:
            raise OpError(StoreCode.BAD_REQUEST, f"commit of {kid}: header compat hash {header.compat_hash} "
                                                 f"differs from this client's {namespace}")
        if header.nbytes != e.nbytes:
            raise OpError(StoreCode.BAD_REQUEST, f"commit of {kid}: header says {header.nbytes} bytes, reserved "
                                                 f"{e.nbytes}")
        return e
