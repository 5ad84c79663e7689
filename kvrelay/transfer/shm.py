"""`shm`: same-host transport over POSIX shared memory (/dev/shm).

Owns: shared-memory segments named ``kvrelay-<pid>-<epoch>-<region>`` (created by `alloc`, unlinked
at `deregister`/`close`, and swept when their creating process is dead), the mapping of peers'
segments, and the copy engine.  A read or write is exactly one memcpy between a local region and the
peer's mapped segment; `map_remote` gives zero copies (the reader uses the peer's memory in place).
Must not touch: the control plane (endpoint.py) or chunk contents.

Which regions peers can reach: those made by `alloc(nbytes)` (shared memory).  `register(buf)` of
ordinary memory gives a local-only region (usable as the local side of descriptors); naming it as
a peer's remote region raises ValueError saying to use `alloc`.

Transfers of up to `INLINE_BYTES` copy on the caller's thread before `read`/`write` returns; larger
ones are cut into `STEP_BYTES` steps that the endpoint's copy thread claims one by one until a thread
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
import queue
import threading
import time

import numpy as np

try:
    from kvrelay import _native  # the pooled copy (csrc/pool.c); without it, numpy on one thread
except ImportError:
    _native = None  # type: ignore[assignment]  # the name is typed as the module; None: not built

from kvrelay.transfer.base import Desc, Peer, RegionInfo, XferState
from kvrelay.transfer.buffers import LocalRegion
from kvrelay.transfer.endpoint import Endpoint, PeerConn
from kvrelay.transfer.handle import Handle

SHM_DIR = "/dev/shm"
PREFIX = "kvrelay-xfer-"
INLINE_BYTES = 4 << 20  # measured here: inline beats a hand-off up to ~4 MiB (fewer wake-ups, warm caches)
STEP_BYTES = 4 << 20    # cancel, deadline and peer checks happen between steps
GIL_COPY_BYTES = 64 << 10


class _Job:
    """A large transfer cut into steps that the copy thread, then a thread waiting on it, claim one by one."""

    __slots__ = ("conn", "handle", "steps", "next", "left", "lock", "waiting")

    def __init__(self, conn: PeerConn, handle: Handle, steps: list[tuple[memoryview, memoryview]]) -> None:
        self.conn = conn
        self.handle = handle
        self.steps = steps
        self.next = 0            # the first unclaimed step
        self.left = len(steps)   # steps not yet copied
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


def segments() -> list[str]:
    """Names of kvrelay shared-memory segments that exist now (a leak counter for tests)."""
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(PREFIX))
    except FileNotFoundError:
        return []


def sweep_stale() -> list[str]:
    """Unlink segments whose creating process no longer exists; return their names."""
    removed = []
    for name in segments():
        try:
            pid = int(name[len(PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if not _pid_running(pid):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited: its memory is gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # reaped meanwhile: the read fails with ESRCH (it killed the ctrl thread)
        return False


def _map(name: str, nbytes: int, create: bool) -> mmap.mmap:
    path = os.path.join(SHM_DIR, name)
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if create:
            os.ftruncate(fd, nbytes)
        elif os.fstat(fd).st_size < nbytes:
            raise ValueError(f"shared-memory segment {name} is {os.fstat(fd).st_size} bytes, "
                             f"the peer announced {nbytes}")
        return mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    finally:
        os.close(fd)


class ShmTransport(Endpoint):
    name = "shm"

    def __init__(self, agent_name: str, compat_hash: str, host: str = "127.0.0.1", port: int = 0,
                 inline_bytes: int = INLINE_BYTES) -> None:
        sweep_stale()
        self.inline_bytes = inline_bytes
        self._owned: dict[int, tuple[str, mmap.mmap]] = {}
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        super().__init__(agent_name, compat_hash, host, port)
        self._copier = threading.Thread(target=self._copy_loop, name=f"kvrelay-shm-{agent_name}-copy", daemon=True)
        self._copier.start()

    # -- regions ---------------------------------------------------------------------------------
    def alloc(self, nbytes: int) -> tuple[RegionInfo, memoryview]:
        self._check_open()
        if nbytes <= 0:
            raise ValueError(f"alloc needs nbytes > 0, got {nbytes}")
        with self._lock:
            rid = self._next_region
            self._next_region += 1
        name = f"{PREFIX}{os.getpid()}-{self.epoch[:12]}-{rid}"
        mm = _map(name, nbytes, create=True)
        view = memoryview(mm)
        region = LocalRegion(rid, view, nbytes, meta=name.encode(), keep=[mm])
        with self._lock:
            self._regions[rid] = region
            self._owned[rid] = (name, mm)
        return RegionInfo(rid, nbytes, "cpu", region.meta), view

    def _drop_region(self, region: LocalRegion) -> None:
        owned = self._owned.pop(region.region_id, None)
        if owned is None:
            return
        name, mm = owned
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            pass
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
        return self._mapped(conn, region_id)

    def _mapped(self, conn: PeerConn, region_id: int) -> memoryview:
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
                    view = maps[region_id] = memoryview(_map(info.meta.decode(), info.nbytes, create=False))
        return view

    @staticmethod
    def _reachable(region: RegionInfo) -> bool:
        return bool(region.meta)  # only shared-memory regions (made by alloc) can be a remote side

    def _validate(self, peer: Peer, op: str, descs: list[Desc]) -> None:
        for i, d in enumerate(descs):
            if not peer.region(d.remote_region).meta:
                raise ValueError(f"descriptor {i}: peer {peer.name!r} region {d.remote_region} is not in shared "
                                 f"memory; the peer must create it with alloc()")

    def _peer_lost(self, conn: PeerConn) -> None:
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
        if pid and (conn.pidfd_readable() or not _pid_running(pid)):
            for r in conn.peer.info.regions:
                if r.meta:
                    try:
                        os.unlink(os.path.join(SHM_DIR, r.meta.decode()))
                    except FileNotFoundError:
                        pass

    # -- copies ----------------------------------------------------------------------------------
    def _transfer(self, op: str, peer: Peer, descs, timeout: float) -> Handle:
        # The common small case in as few steps as possible (measured: ~70 us of a 1 MiB read with cold
        # caches went to the general path): one descriptor, inline-sized, a live peer, its region mapped
        # already.  A mapped view is as long as the peer announced its region, so the bounds are the
        # same checks `check_descs` makes; anything else takes the general path.
        if type(descs) in (list, tuple) and len(descs) == 1 and not self._closed:
            d = descs[0]
            n, lo, ro = d.length, d.local_offset, d.remote_offset
            conn = self._peers.get(peer.name)
            if conn is not None and conn.alive and 0 < n <= self.inline_bytes and lo >= 0 and ro >= 0:
                local = self._regions.get(d.local_region)
                remote = conn.extra.get("maps", _NO_MAPS).get(d.remote_region)
                if (local is not None and remote is not None and lo + n <= local.nbytes and ro + n <= len(remote)
                        and conn.peer.info.epoch == peer.info.epoch):
                    handle = Handle(peer=peer.name, op=op, nbytes=n, timeout=timeout, on_release=self._released,
                                    conn=conn)
                    with self._lock:
                        self._handles.add(handle)
                    if op == "read":
                        _copy(local.view[lo:lo + n], remote[ro:ro + n])
                    else:
                        _copy(remote[ro:ro + n], local.view[lo:lo + n])
                    self._complete(conn, handle)
                    return handle
        return super()._transfer(op, peer, descs, timeout)

    def _start(self, conn: PeerConn, op: str, descs: list[Desc], handle: Handle) -> None:
        try:
            pairs = self._pairs(conn, op, descs)
        except (ValueError, OSError) as exc:
            handle.fail(f"cannot map peer {conn.peer.name!r} memory: {exc}")
            return
        if handle.nbytes <= self.inline_bytes:
            handle.set_transferring()
            for dst, src in pairs:
                _copy(dst, src)
            self._complete(conn, handle)
            return
        steps = [(dst[off:off + STEP_BYTES], src[off:off + STEP_BYTES])
                 for dst, src in pairs for off in range(0, len(dst), STEP_BYTES)]
        job = _Job(conn, handle, steps)
        handle._progress = lambda timeout: self._help(job, timeout)
        self._jobs.put(job)

    def _pairs(self, conn: PeerConn, op: str, descs: list[Desc]) -> list[tuple[memoryview, memoryview]]:
        regions = self._regions
        maps = conn.extra.get("maps") or {}
        pairs = []
        for d in descs:
            local = regions[d.local_region].view[d.local_offset:d.local_offset + d.length]
            remote = maps.get(d.remote_region) or self._mapped(conn, d.remote_region)
            remote = remote[d.remote_offset:d.remote_offset + d.length]
            pairs.append((local, remote) if op == "read" else (remote, local))
        return pairs

    def _complete(self, conn: PeerConn, handle: Handle) -> None:
        if self.peer_exited(conn):
            handle.fail(f"peer {conn.peer.name!r} (pid {conn.peer.info.pid}) exited before the {handle.op} "
                        f"finished")
        else:
            handle.finish(XferState.DONE)

    def _help(self, job: "_Job", timeout: float) -> None:
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

    def _run(self, job: "_Job", copier: bool = False, until: float = float("inf")) -> None:
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
            if handle.done or handle.expire_if_due() or self.peer_exited(conn):
                with job.lock:
                    job.next = len(job.steps)  # nobody copies more of it
                self._complete(conn, handle)  # FAILED (peer exited) unless already terminal
                if self.peer_exited(conn) and conn.alive:
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

    def _shutdown(self) -> None:
        self._jobs.put(None)
        self._copier.join(timeout=5)
