"""`shm`: same-host transport over POSIX shared memory (/dev/shm).

Owns: `ShmTransport`: which memory it exposes (shared-memory segments created by `alloc`, unlinked at
`deregister`/`close`) and `map_remote`.  Its parts: shm_segments.py (naming, mapping and sweeping the
segments of dead processes) and shm_copy.py (`ShmMover`, the copy engine: the transport's data mover and
its same-host fast path, and peers' mapped segments).  A read or write is exactly one memcpy between a
local region and the peer's mapped segment; `map_remote` gives zero copies (the reader uses the peer's
memory in place).  Must not touch: the control plane (control_plane.py) or chunk contents.

Which regions peers can reach: those made by `alloc(nbytes)` (shared memory).  `register(buf)` of
ordinary memory gives a local-only region (usable as the local side of descriptors); naming it as
a peer's remote region raises ValueError saying to use `alloc`.

Transfers of up to `INLINE_BYTES` copy on the caller's thread before `read`/`write` returns; larger
ones are cut into `STEP_BYTES` steps (shm_copy.py) that the mover's copy thread claims one by one until a thread
waits on the handle: the waiting thread then copies the remaining steps itself (no hand-off back when
the caller waits anyway; one thread claims steps at a time, which measured faster on two busy cores
than two threads sharing them; each copy above 64 KiB is one native pooled copy, itself on both cores
from 1 MiB).  Cancel, deadline and peer liveness are checked between steps.  A
transfer whose peer exited before it finished FAILS (a write into a dead process's memory went
nowhere), and that peer's segments are unlinked.
"""

from __future__ import annotations

import mmap
import os

from kvrelay.transfer.base import Desc, Peer, RegionInfo
from kvrelay.transfer.buffers import LocalRegion
from kvrelay.transfer.control import PeerConn
from kvrelay.transfer.endpoint import Endpoint
from kvrelay.transfer.mover import DataMover, SameHostPath
from kvrelay.transfer.shm_copy import ShmMover
from kvrelay.transfer.shm_segments import PREFIX, map_segment, segments, sweep_stale, unlink_segment

__all__ = ["ShmTransport", "ShmMover", "segments", "sweep_stale", "INLINE_BYTES", "PREFIX"]

INLINE_BYTES = 4 << 20  # measured here: inline beats a hand-off up to ~4 MiB (fewer wake-ups, warm caches)


class ShmTransport(Endpoint):
    name = "shm"

    def __init__(self, agent_name: str, compat_hash: str, host: str = "127.0.0.1", port: int = 0,
                 inline_bytes: int = INLINE_BYTES) -> None:
        sweep_stale()
        self.inline_bytes = inline_bytes
        self._owned: dict[int, tuple[str, mmap.mmap]] = {}
        super().__init__(agent_name, compat_hash, host, port)

    def _data_mover(self) -> DataMover:
        self._shm = ShmMover(self.agent_name, self._regions, self._handles, self._plane.lose, self.inline_bytes)
        return self._shm

    def _same_host_path(self) -> SameHostPath:
        return self._shm

    # -- regions ---------------------------------------------------------------------------------
    def alloc(self, nbytes: int) -> tuple[RegionInfo, memoryview]:
        self._check_open()
        if nbytes <= 0:
            raise ValueError(f"alloc needs nbytes > 0, got {nbytes}")
        rid = self._new_region_id()
        name = f"{PREFIX}{os.getpid()}-{self.epoch[:12]}-{rid}"
        mm = map_segment(name, nbytes, create=True)
        view = memoryview(mm)
        region = LocalRegion(rid, view, nbytes, meta=name.encode(), keep=[mm])
        with self._lock:
            self._owned[rid] = (name, mm)
        return self._add_region(region), view

    def _drop_region(self, region: LocalRegion) -> None:
        owned = self._owned.pop(region.region_id, None)
        if owned is None:
            return
        name, mm = owned
        unlink_segment(name)
        try:
            region.view.release()
            mm.close()
        except BufferError:
            pass  # the application still holds views of it; the mapping goes when they do

    # -- peers' segments -------------------------------------------------------------------------
    def map_remote(self, peer: Peer, region_id: int) -> memoryview:
        """The peer's region mapped into this process: zero-copy access (valid while the peer lives)."""
        conn = self._conn(peer)
        if not isinstance(conn, PeerConn):
            raise ValueError(conn)
        return self._shm.mapped(conn, region_id)

    @staticmethod
    def _reachable(region: RegionInfo) -> bool:
        return bool(region.meta)  # only shared-memory regions (made by alloc) can be a remote side

    def _validate(self, peer: Peer, op: str, descs: list[Desc]) -> None:
        for i, d in enumerate(descs):
            if not peer.region(d.remote_region).meta:
                raise ValueError(f"descriptor {i}: peer {peer.name!r} region {d.remote_region} is not in shared "
                                 f"memory; the peer must create it with alloc()")
