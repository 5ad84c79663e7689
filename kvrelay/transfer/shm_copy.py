"""`shm`'s copy engine: `ShmMover`, the transport's data mover (mover.py) and its same-host fast path.

Owns: peers' mapped segments (each `PeerConn`'s ``extra["maps"]``, unmapped when the peer is lost, and a dead
peer's segments unlinked), inline copies on the caller's thread, and large transfers cut into steps that the
copy thread, then a thread waiting on the handle, claim one by one (shm.py's docstring says why).
Must not touch: the control plane (control_plane.py), the endpoint's regions (it reads them, never changes
them), segment naming (shm_segments.py), chunk contents.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from typing import Callable

import numpy as np

try:
    from kvrelay import _native  # the pooled copy (csrc/pool.c); without it, numpy on one thread
except ImportError:
    _native = None  # type: ignore[assignment]  # the name is typed as the module; None: not built

from kvrelay.proc import pid_alive
from kvrelay.transfer.base import Desc, XferState
from kvrelay.transfer.buffers import LocalRegion
from kvrelay.transfer.control import PeerConn
from kvrelay.transfer.handle import Handle
from kvrelay.transfer.handles import HandleTable
from kvrelay.transfer.mover import DataMover, SameHostPath, Transfer
from kvrelay.transfer.shm_segments import map_segment, unlink_segment

STEP_BYTES = 4 << 20    # cancel, deadline and peer checks happen between steps
GIL_COPY_BYTES = 64 << 10


class _Job:
    """A large transfer cut into steps that the copy thread, then a thread waiting on it, claim one by one."""

    __slots__ = ("conn", "handle", "steps", "next", "left", "lock", "waiting")

    handle: Handle  # set once opened: the handle's driver (`ShmMover.help`) is this job

    def __init__(self, conn: PeerConn) -> None:
        self.conn = conn
        self.steps: list[tuple[memoryview, memoryview]] = []
        self.next = 0            # the first unclaimed step
        self.left = 0            # steps not yet copied
        self.lock = threading.Lock()
        self.waiting = False     # a thread waits on the handle: the copy thread leaves the rest to it


_NO_MAPS: dict = {}


def _copy(dst: memoryview, src: memoryview) -> None:
    if len(dst) <= GIL_COPY_BYTES:
        dst[:] = src  # memoryview assignment: the cheapest call for small copies (holds the GIL)
    elif _native is not None:
        _native.copy_into(dst, src, False, False)  # the native pool: both cores from 1 MiB, GIL released, no spinning
    else:
        np.copyto(np.frombuffer(dst, np.uint8), np.frombuffer(src, np.uint8))  # releases the GIL


class ShmMover(DataMover, SameHostPath):
    """The copy engine (the module docstring)."""

    def __init__(self, agent_name: str, regions: dict[int, LocalRegion], table: HandleTable,
                 lose: Callable[[PeerConn, str], None], inline_bytes: int) -> None:
        self.inline_bytes = inline_bytes
        self._regions = regions  # the endpoint's local regions (read only)
        self._table = table
        self._lose = lose        # the control plane's: mark a peer lost
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._copier = threading.Thread(target=self._copy_loop, name=f"kvrelay-shm-{agent_name}-copy", daemon=True)
        self._copier.start()

    def mapped(self, conn: PeerConn, region_id: int) -> memoryview:
        maps: dict = conn.extra.setdefault("maps", {})
        view = maps.get(region_id)
        if view is None:
            info = conn.peer.region(region_id)
            if not info.meta:
                raise ValueError(f"peer {conn.peer.name!r} region {region_id} is not in shared memory: the peer "
                                 f"must create it with alloc() to expose it over shm")
            with conn.lock:
                view = maps.get(region_id)
                if view is None:
                    view = maps[region_id] = memoryview(map_segment(info.meta.decode(), info.nbytes, create=False))
        return view

    def peer_lost(self, conn: PeerConn) -> None:
        maps = conn.extra.pop("maps", {})
        for view in maps.values():
            obj = view.obj
            try:
                view.release()
                obj.close()
            except BufferError:
                pass
        pid = conn.peer.info.pid
        # pidfd readable: exited for sure (it is readable slightly before /proc shows a zombie)
        if pid and (conn.pidfd_readable() or not pid_alive(pid)):
            for r in conn.peer.info.regions:
                if r.meta:
                    unlink_segment(r.meta.decode())

    # -- copies ----------------------------------------------------------------------------------
    def transfer_one(self, conn: PeerConn, op: str, desc: Desc, timeout: float) -> Handle | None:
        # The common small case in as few steps as possible (measured: ~70 us of a 1 MiB read with cold
        # caches went to the general path): one descriptor, inline-sized, its peer region mapped already.
        # A mapped view is as long as the peer announced its region, so the bounds are the same checks
        # `check_descs` makes; anything else takes the general path.
        n, lo, ro = desc.length, desc.local_offset, desc.remote_offset
        if 0 < n <= self.inline_bytes and lo >= 0 and ro >= 0:
            local = self._regions.get(desc.local_region)
            remote = conn.extra.get("maps", _NO_MAPS).get(desc.remote_region)
            if local is not None and remote is not None and lo + n <= local.nbytes and ro + n <= len(remote):
                handle = self._table.open(conn.peer.name, op, n, timeout, conn)
                if op == "read":
                    _copy(local.view[lo:lo + n], remote[ro:ro + n])
                else:
                    _copy(remote[ro:ro + n], local.view[lo:lo + n])
                self._complete(conn, handle)
                return handle
        return None

    def start(self, xfer: Transfer) -> Handle:
        conn = xfer.conn
        if xfer.nbytes <= self.inline_bytes:
            handle = xfer.open()
            job = None
        else:  # the steps go to the copy thread; whoever waits on the handle copies the rest (`help`)
            job = _Job(conn)
            handle = job.handle = xfer.open(progress=functools.partial(self.help, job))
        try:
            pairs = self._pairs(conn, xfer.op, xfer.descs)
        except (ValueError, OSError) as exc:
            handle.fail(f"cannot map peer {conn.peer.name!r} memory: {exc}")
            return handle
        if job is None:
            handle.set_transferring()
            for dst, src in pairs:
                _copy(dst, src)
            self._complete(conn, handle)
            return handle
        job.steps = [(dst[off:off + STEP_BYTES], src[off:off + STEP_BYTES])
                     for dst, src in pairs for off in range(0, len(dst), STEP_BYTES)]
        job.left = len(job.steps)
        self._jobs.put(job)
        return handle

    def _pairs(self, conn: PeerConn, op: str, descs: list[Desc]) -> list[tuple[memoryview, memoryview]]:
        regions = self._regions
        maps = conn.extra.get("maps") or {}
        pairs = []
        for d in descs:
            local = regions[d.local_region].view[d.local_offset:d.local_offset + d.length]
            remote = maps.get(d.remote_region) or self.mapped(conn, d.remote_region)
            remote = remote[d.remote_offset:d.remote_offset + d.length]
            pairs.append((local, remote) if op == "read" else (remote, local))
        return pairs

    @staticmethod
    def _complete(conn: PeerConn, handle: Handle) -> None:
        if conn.exited():
            handle.fail(f"peer {conn.peer.name!r} (pid {conn.peer.info.pid}) exited before the {handle.op} "
                        f"finished")
        else:
            handle.finish(XferState.DONE)

    def help(self, job: _Job, timeout: float) -> None:
        """A thread waiting on a large transfer copies its unclaimed steps itself (the copy thread stops
        claiming them), then sleeps until a step the copy thread had claimed is done.  A waiter whose
        timeout ends first hands the remaining steps back to the copy thread."""
        if timeout <= 0:
            return
        until = time.monotonic() + timeout
        job.waiting = True
        self._run(job, until=until)
        if job.handle.done:
            return
        if job.next < len(job.steps):
            job.waiting = False
            self._jobs.put(job)
        else:
            job.handle.block(until - time.monotonic())

    def _run(self, job: _Job, copier: bool = False, until: float = float("inf")) -> None:
        """Claim and copy steps until none is left, or, on the copy thread, until a thread waits on the
        handle (a waiter: until ``until``).  Checks cancel, deadline and the peer's life between steps;
        whoever finishes the last step completes the handle.  Each step is one native pooled copy (two
        threads from 1 MiB, GIL released; its workers sleep between jobs and it falls back to the caller
        alone when a worker lags).  Not torch's copy_: its OpenMP workers spin after each call, and on two
        busy cores that stalls the other threads (measured: up to 10x slower)."""
        conn, handle = job.conn, job.handle
        handle.set_transferring()
        while True:
            if copier and job.waiting:
                return  # the waiting thread copies the rest
            if until != float("inf") and time.monotonic() >= until:
                return
            with job.lock:
                if job.next >= len(job.steps):
                    return
                dst, src = job.steps[job.next]
                job.next += 1
            if handle.done or handle.expire_if_due() or conn.exited():
                with job.lock:
                    job.next = len(job.steps)  # nobody copies more of it
                self._complete(conn, handle)  # FAILED (peer exited) unless already terminal
                if conn.exited() and conn.alive:
                    self._lose(conn, f"peer {conn.peer.name!r} (pid {conn.peer.info.pid}) exited")
                return
            _copy(dst, src)
            with job.lock:
                job.left -= 1
                last = job.left == 0
            if last:
                self._complete(conn, handle)
                return

    def _copy_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self._run(job, copier=True)

    def close(self) -> None:
        self._jobs.put(None)
        self._copier.join(timeout=5)
