"""`StoreClient`: the library engines use to talk to a `kvrelay store` daemon.

Owns: the API engines call, the re-handshake with a restarted daemon (a new epoch: new data path), and
the choice of data path (mapped pool on the same host, or a transport).  The sockets, round trips and
pipelined replies are control.py's.  Must not touch: the daemon's state or the pool allocator.

    c = StoreClient("tcp://127.0.0.1:5600", compat_hash=layout.compat_hash(model_id))
    c.reserve(request_id, [(key, nbytes), ...])        # all or StoreFullError
    buf = c.publish_buffer(key); pack_into(buf); c.commit(key, header)
    hdr = c.pull(key, out, deadline=time.monotonic() + 5)   # waits until committed, verifies checksum
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
import time
from typing import Any, Sequence

import numpy as np
import torch
import zmq

from kvrelay.keys import ChunkKey, kid_of
from kvrelay.store import protocol as P
from kvrelay.store.control import ControlChannel
from kvrelay.store.errors import StoreCode, StoreError, StoreFullError
from kvrelay.store.datapath import SharedPath, TransportPath
from kvrelay.transfer.wire import ChunkHeader, copy_into, verify


PULL_GRACE_S = 1.0
log = logging.getLogger("kvrelay.store.client")
PARALLEL_ABOVE = 1 << 20  # remote pull_many verifies chunks this big on PULL_THREADS behind the transfers
PULL_THREADS = 2
TOUCH_BATCH = 256  # directory pulls reported per message when no other request carries them
TOUCH_MAX_AGE = 0.25  # ... or once the oldest unreported one is this old (seconds)


def _token_list(tokens: Sequence[int]) -> list[int]:
    """A prompt's token ids as a list of ints for the wire (a list already is one: no copy)."""
    return tokens if isinstance(tokens, list) else np.asarray(tokens, np.int64).tolist()


class StoreClient(ControlChannel):
    def __init__(self, address: str, *, transport: str = "shm", compat_hash: str, name: str = "client",
                 timeout: float = 10.0, staging_bytes: int = 256 << 20, control: str = "auto",
                 local_reads: bool = True) -> None:
        if not address.startswith("tcp://"):
            raise ValueError(f"store address {address!r} must look like tcp://127.0.0.1:5600")
        if not compat_hash:
            raise ValueError("compat_hash is required (KVLayout.compat_hash(model_id)); it namespaces your chunks")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        from kvrelay.transfer import check_store_transport
        check_store_transport(transport)
        if control not in ("auto", "zmq"):
            raise ValueError(f"control {control!r}: choose auto (the daemon's same-host socket if it offers one) "
                             f"or zmq")
        self.address, self.transport, self.compat_hash, self.name = address, transport, compat_hash, name
        self.control = control
        self.local_reads = local_reads  # shm: pull ready chunks through the daemon's shared directory
        self.timeout = timeout
        self._open_channel()
        self._slots: dict[str, P.Slot] = {}
        self._views: dict[str, torch.Tensor] = {}
        self._requests: dict[str, set[str]] = {}  # request_id -> kids reserved and not yet committed
        self._kid_req: dict[str, str] = {}
        self._closed = False
        self._staging_bytes = staging_bytes
        self._user_bufs: list[torch.Tensor] = []  # register_buffer()s, replayed on a new data path
        self._retired: list = []  # data paths of a previous daemon epoch (other threads may still copy)
        try:
            self.info = self._call(P.Hello(name=name, compat_hash=compat_hash, transport=transport)).info
            self._path = self._make_path(self.info)
            self._ready = True
            if self.info.get("local") and control == "auto":  # from now on: the same-host socket
                self._drop_link(self._sock())
        except BaseException:
            self._close_sockets()
            raise

    def _make_path(self, info: dict):
        if self.transport == "shm":
            directory = info.get("directory") if self.local_reads else None
            return SharedPath(info["pool_name"], info["pool_bytes"], directory)
        return TransportPath(self.transport, self.name, info["endpoints"][self.transport], self._staging_bytes,
                             self.timeout)

    def _hello(self, sock) -> None:
        """(Re-)introduce this socket; if the daemon is a new one (restarted: another epoch), start over with it:
        a fresh data path (pool mapping or transport peer), no reservations, no pins."""
        hello = P.Hello(name=self.name, compat_hash=self.compat_hash, transport=self.transport)
        info = self._roundtrip(sock, hello, self.timeout).info
        with self._lock:
            if info.get("epoch") == self.info.get("epoch"):
                return
            log.warning("store at %s restarted (epoch %s -> %s): remapping its data path; reservations and pins "
                        "of the old daemon are gone", self.address, self.info.get("epoch"), info.get("epoch"))
            path = self._make_path(info)
            for buf in self._user_bufs:
                path.register_buffer(buf)
            for old in self._retired:  # two restarts ago: no copy of that epoch is still running
                old.close()
            self._retired = [self._path]
            self._path, self.info = path, info
            self._link_gen += 1  # every thread opens a fresh link: the new daemon's same-host socket again
            self._slots.clear()
            self._views.clear()
            self._requests.clear()
            self._kid_req.clear()
            self._unpin.clear()

    # --- API ---------------------------------------------------------------------------------------
    def lookup(self, keys: list[ChunkKey], tenant: str = "") -> int:
        """How many of ``keys``, from the first, are ready; ``tenant`` (the request's cache_salt) is who asks."""
        return self._call(P.Lookup(keys=list(keys), tenant=tenant)).count

    def reserve(self, request_id: str, chunks: list[tuple[ChunkKey, int]], ttl: float = 60.0,
                tenant: str = "", tokens: Sequence[int] = ()) -> None:
        """Reserve pool slots for chunks, booked to ``tenant`` (the request's cache_salt: its quota applies,
        code `StoreCode.QUOTA` when over it); ``tokens``, the prompt's token ids, describe the chunks in KV events."""
        keys = [k for k, _ in chunks]
        slots = self._call(P.Reserve(request_id=request_id, keys=keys, nbytes=[int(n) for _, n in chunks],
                                     ttl=ttl, tenant=tenant, tokens=_token_list(tokens))).slots
        with self._lock:
            for k, s in zip(keys, slots, strict=True):
                self._slots[kid_of(k)] = s
            self._requests.setdefault(request_id, set()).update(kid_of(k) for k in keys)
            self._kid_req.update((kid_of(k), request_id) for k in keys)

    def use_gpu(self) -> None:
        """Say this client copies between CUDA memory and its `publish_buffer`s / pull outputs: a same-host
        client pins the mapped pool then, in the background (never before: a CPU client makes no CUDA call)."""
        self._path.use_gpu()

    def gpu_pinning(self, timeout: float = 0.0) -> dict[str, Any] | None:
        """After `use_gpu`, how the pinning of the mapped pool went: waits up to ``timeout`` s for it to finish,
        then ``{"pinned_bytes", "seconds", "error"}`` (error None: all pinned); None for a client that maps no
        pool (a remote one)."""
        pinner = getattr(self._path, "pinner", None)  # only the same-host path maps (and pins) the pool
        if pinner is None:
            return None
        pinner.wait(timeout)
        return {"pinned_bytes": pinner.pinned_bytes, "seconds": pinner.seconds, "error": pinner.error}

    def publish_buffer(self, key: ChunkKey) -> torch.Tensor:
        kid = kid_of(key)
        with self._lock:
            slot = self._slots.get(kid)
            view = self._views.get(kid)
        if slot is None:
            raise StoreError(f"publish_buffer({kid}): not reserved by this client; call reserve() first",
                             StoreCode.NOT_FOUND)
        if view is None:
            view = torch.empty(slot.nbytes, dtype=torch.uint8) if slot.present else self._path.publish_view(slot)
            with self._lock:
                self._views[kid] = view
        return view

    def commit(self, key: ChunkKey, header: ChunkHeader, *, wait: bool = True) -> None:
        """Hand the filled slot to the store, which verifies length and checksum, marks it ready and wakes
        waiters.  ``wait=False`` pipelines: it returns at once, and the commit goes out with this thread's
        other queued ones as one message (at `flush()`, before this thread's next request, or once
        COMMIT_BATCH are queued); a failure is raised by this thread's next call or by `flush()`.  So a layer's
        chunks cost one message and one round trip, not one each: call `flush()` when a layer is done."""
        kid = kid_of(key)
        with self._lock:
            slot = self._slots.pop(kid, None)
            view = self._views.pop(kid, None)
            rid = self._kid_req.pop(kid, None)
            if rid is not None:
                kids = self._requests[rid]
                kids.discard(kid)
                if not kids:
                    del self._requests[rid]
        if slot is not None and slot.present:
            return  # the store already had this content-addressed chunk
        if slot is not None and view is not None:
            self._path.flush(slot, view, self.timeout)
        if wait:
            self._call(P.Commit(key=key, header=header))
        else:
            self._queue_commit(key, header)

    def publish(self, key: ChunkKey, header: ChunkHeader, payload, *, wait: bool = True) -> None:
        """Copy ``payload`` into the chunk's slot and commit it (reserving first if needed).  The checksum of
        the copied bytes is computed behind the copy (one pass) and must equal ``header.checksum``, so a wrong
        header is refused here, before anything is committed.  ``wait`` as in `commit`."""
        src = _as_uint8(payload)
        kid = kid_of(key)
        if src.numel() != header.nbytes:
            raise ValueError(f"publish({kid}): payload is {src.numel()} bytes, header says {header.nbytes}")
        if kid not in self._slots:
            self.reserve(f"publish:{kid}", [(key, header.nbytes)])
        path, slot = self._path, self._slots.get(kid)
        got: int | None
        if isinstance(path, SharedPath) and slot is not None and not slot.present and kid not in self._views:
            got = path.publish_into(slot, src)  # straight into the mapped slot, by address
        else:  # a pool slot: nobody reads it soon
            got = copy_into(self.publish_buffer(key), src if src.device.type == "cpu" else src.cpu(), True, stream=True)
        if got != header.checksum:
            raise ValueError(f"publish({kid}): the payload's checksum is {got:#018x}, the header says "
                             f"{header.checksum:#018x}; nothing was committed")
        self.commit(key, header, wait=wait)

    def pull(self, key: ChunkKey, out: torch.Tensor, deadline: float, verify_checksum: bool = True,
             request_id: str = "") -> ChunkHeader:
        if out.dtype != torch.uint8 or out.device.type not in ("cpu", "cuda") or not out.is_contiguous():
            raise ValueError(f"pull needs a contiguous uint8 CPU or CUDA tensor, got {out.dtype} on {out.device}")
        if self._closed:
            raise StoreError("the StoreClient is closed", StoreCode.CLOSED)
        path = self._path
        if isinstance(path, SharedPath) and path.directory is not None:
            kid = kid_of(key)
            header = path.pull_local(kid, out, verify_checksum)
            if header is not None:
                self._touch([kid])
                return header
        left = deadline - time.monotonic()
        rep = self._call(P.Pull(key=key, timeout=max(0.0, left), request_id=request_id),
                         wait=max(0.0, left) + self._grace, late=StoreCode.TIMEOUT)
        slot, header = rep.slots[0], rep.header
        try:
            if header is None:
                raise StoreError(f"pull({kid_of(key)}): the store's answer has no chunk header", StoreCode.INTERNAL)
            if out.numel() < header.nbytes:
                raise ValueError(f"pull({kid_of(key)}): out has {out.numel()} bytes, the chunk has {header.nbytes}")
            dst = out[:header.nbytes]
            bad = self._path.pull_many_into([slot], [dst], max(0.1, deadline - time.monotonic()),
                                            [header.checksum] if verify_checksum else None, None)
        finally:
            with self._lock:
                self._unpin.append(slot.pin)
        if bad:
            raise _corrupt("pull", key, header, dst)
        return header

    def pull_many(self, keys: Sequence[ChunkKey], outs: Sequence[torch.Tensor], deadline: float,
                  verify_checksum: bool = True, request_id: str = "") -> list[ChunkHeader]:
        """`pull` for many chunks with ONE control round trip: waits (until ``deadline``) until every key is
        ready, then moves them and verifies every checksum (on shm, each leaf hashed just before its copy;
        through a transport, one multi-descriptor read, or, when verifying several chunks of 1 MiB or more,
        one read per chunk, two in flight, each chunk verified while the next moves; on shm, chunks already
        ready come straight out of the pool through the shared directory, with no round trip).
        ``outs[i]`` receives chunk i; ``outs`` must not overlap; the batch must fit in the pool pinned at
        once.  Raises like `pull` (TimeoutError names the first missing key, "corrupt" the first bad chunk)."""
        keys, outs = list(keys), list(outs)
        if len(keys) != len(outs):
            raise ValueError(f"pull_many: {len(keys)} keys but {len(outs)} output tensors")
        for out in outs:
            if out.dtype != torch.uint8 or out.device.type not in ("cpu", "cuda") or not out.is_contiguous():
                raise ValueError(f"pull_many needs contiguous uint8 CPU or CUDA tensors, got {out.dtype} on "
                                 f"{out.device}")
        if not keys:
            return []
        if self._closed:
            raise StoreError("the StoreClient is closed", StoreCode.CLOSED)
        path = self._path
        if isinstance(path, SharedPath) and path.directory is not None:  # ready ones without a round trip
            return self._pull_many_local(path, keys, outs, deadline, verify_checksum, request_id)
        return self._pull_many_daemon(keys, outs, deadline, verify_checksum, request_id)

    def _pull_many_daemon(self, keys: list[ChunkKey], outs: list[torch.Tensor], deadline: float,
                          verify_checksum: bool, request_id: str) -> list[ChunkHeader]:
        left = deadline - time.monotonic()
        rep = self._call(P.PullMany(keys=keys, timeout=max(0.0, left), request_id=request_id),
                         wait=max(0.0, left) + self._grace, late=StoreCode.TIMEOUT)
        slots, headers = rep.slots, rep.headers
        try:
            if len(slots) != len(keys) or len(headers) != len(keys):
                raise StoreError(f"pull_many: the store answered {len(slots)} slots for {len(keys)} keys",
                                 StoreCode.INTERNAL)
            dsts = []
            for k, out, h in zip(keys, outs, headers, strict=True):
                if out.numel() < h.nbytes:
                    raise ValueError(f"pull_many({kid_of(k)}): out has {out.numel()} bytes, the chunk has {h.nbytes}")
                dsts.append(out[:h.nbytes])
            big = sum(h.nbytes >= PARALLEL_ABOVE for h in headers) > 1
            bad = self._path.pull_many_into(slots, dsts, max(0.1, deadline - time.monotonic()),
                                            [h.checksum for h in headers] if verify_checksum else None,
                                            self._workers() if big else None)
        finally:
            with self._lock:
                self._unpin.extend(s.pin for s in slots)
        if bad:
            i = bad[0]
            raise _corrupt("pull_many", keys[i], headers[i], dsts[i], f" ({len(bad)} of {len(keys)} chunks bad)")
        return headers

    def _pull_many_local(self, path: SharedPath, keys: list[ChunkKey], outs: list[torch.Tensor], deadline: float,
                         verify_checksum: bool, request_id: str) -> list[ChunkHeader]:
        headers: list[ChunkHeader | None] = []
        served = []
        directory = path.directory
        live = directory is not None and directory.live()  # once for the batch
        for k, out in zip(keys, outs, strict=True):
            kid = kid_of(k)
            h = path.pull_local(kid, out, verify_checksum, check_live=False) if live else None
            headers.append(h)
            if h is not None:
                served.append(kid)
        if served:
            self._touch(served)
        missing = [i for i, h in enumerate(headers) if h is None]
        got = iter(self._pull_many_daemon([keys[i] for i in missing], [outs[i] for i in missing], deadline,
                                          verify_checksum, request_id) if missing else [])
        return [h if h is not None else next(got) for h in headers]  # the daemon answers one per missing key

    def _touch(self, kids: list[str]) -> None:
        """Report directory pulls to the daemon (LRU, chunk_ttl, counters) with this client's next request;
        they go at once, pipelined (no wait for the answer), once TOUCH_BATCH are waiting or the oldest has
        waited TOUCH_MAX_AGE (a chunk pulled only through the directory must not look idle to the daemon)."""
        now = time.monotonic()
        with self._lock:
            if not self._touched:
                self._touched_since = now
            self._touched.extend(kids)
            due = len(self._touched) >= TOUCH_BATCH or now - self._touched_since >= TOUCH_MAX_AGE
        if due:
            try:
                self._pipeline(self._sock(), P.Ping(), "Ping")
            except StoreError:
                pass  # the pull itself succeeded; the reports go with the next request that gets through

    def _workers(self) -> ThreadPoolExecutor:
        with self._lock:
            pool = getattr(self, "_copy_pool", None)
            if pool is None:
                pool = self._copy_pool = ThreadPoolExecutor(max_workers=PULL_THREADS, thread_name_prefix="kvrelay-pull")
            return pool

    def register_buffer(self, buf: torch.Tensor) -> None:
        """Register a long-lived uint8 CPU tensor (e.g. the engine's staging buffer): remote-transport pulls
        into it (or into a slice of it) go straight there with no staging copy.  A no-op on shm."""
        with self._lock:
            path = self._path
            self._user_bufs.append(buf)
        path.register_buffer(buf)

    def wait_ready(self, keys: Sequence[ChunkKey], deadline: float, request_id: str = "") -> None:
        left = max(0.0, deadline - time.monotonic())
        self._call(P.WaitReady(keys=list(keys), timeout=left, request_id=request_id), wait=left + self._grace,
                   late=StoreCode.TIMEOUT)

    def abort(self, request_id: str, reason: str) -> int:
        """Tell the store this client will not publish ``request_id``: pulls waiting for it (passed the same
        ``request_id``) fail at once with StoreError code `StoreCode.ABORTED`, and so do later ones that would have to
        wait (chunks already committed are still served); returns how many were waiting."""
        return self._call(P.Abort(request_id=request_id, reason=reason)).count

    def lease(self, keys: Sequence[ChunkKey], ttl: float) -> None:
        self._call(P.Lease(keys=list(keys), ttl=ttl))

    def release(self, request_id_or_keys: str | Sequence[ChunkKey]) -> None:
        if isinstance(request_id_or_keys, str):
            rid = request_id_or_keys
            with self._lock:
                for kid in self._requests.pop(rid, set()):
                    self._slots.pop(kid, None)
                    self._kid_req.pop(kid, None)
                    view = self._views.pop(kid, None)
                    if view is not None:
                        self._path.discard(view)
            self._call(P.Release(request_id=rid))
        else:
            self._call(P.Release(keys=list(request_id_or_keys)))

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        """Drop these chunks (memory and SSD) unless pinned or still reserved; returns how many went."""
        return self._call(P.Delete(keys=list(keys))).count

    def purge(self, prefix: str | None = None, namespace: str | None = None) -> int:
        return self._call(P.Purge(prefix=prefix, namespace=namespace)).count

    def purge_tenant(self, tenant: str, by: str = "", timeout: float | None = None) -> dict[str, int]:
        """Drop a tenant's chunks and overwrite their bytes in memory and on SSD (purge.py); recorded in the
        store's journal and audit log under ``by``.  Returns {"chunks", "bytes", "skipped"}."""
        return dict(self._call(P.Purge(tenant=tenant, by=by), wait=timeout).info)

    def stats(self) -> dict:
        return self._call(P.Stats()).info

    @property
    def _grace(self) -> float:
        """How long past a pull's deadline to wait for the daemon's answer: a slowed daemon must not stretch a
        caller's deadline by a whole timeout (the caller recomputes instead; a late answer is dropped)."""
        return min(self.timeout, PULL_GRACE_S)

    def ping(self) -> None:
        self._call(P.Ping())

    def probe(self) -> None:
        """Ping from a short-lived thread (a circuit breaker's probe) and close that thread's link after."""
        try:
            self.ping()
        finally:
            self.drop_thread_link()

    def close(self) -> None:
        if self._closed:
            return
        try:
            if self._unpin or self._touched or self._queued_commits(all_threads=True):
                self._send_all_commits()  # pipelined commits no thread flushed still count
                self._call(P.Ping(), wait=1.0)  # hands back pins; answered after the commits
        except (StoreError, zmq.ZMQError):
            pass
        self._closed = True
        vp = getattr(self, "_copy_pool", None)
        if vp is not None:
            vp.shutdown(wait=True)
        for path in [getattr(self, "_path", None), *getattr(self, "_retired", [])]:
            if path is not None:
                path.close()
        self._close_sockets()

    def __enter__(self) -> "StoreClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _corrupt(op: str, key: ChunkKey, header: ChunkHeader, dst: torch.Tensor, extra: str = "") -> StoreError:
    """The error for a chunk whose bytes failed verification (copied and hashed in one pass): re-checked
    here, so the message names what differs (length or checksum)."""
    try:
        verify(header, dst)
        msg = "checksum mismatch"
    except ValueError as exc:
        msg = str(exc)
    return StoreError(f"{op}({kid_of(key)}): {msg}{extra}", StoreCode.CORRUPT)


def _as_uint8(payload) -> torch.Tensor:
    if isinstance(payload, torch.Tensor):
        if (payload.dtype == torch.uint8 and payload.dim() == 1 and payload.device.type == "cpu"
                and payload.is_contiguous()):
            return payload
        if payload.device.type not in ("cpu", "cuda"):
            payload = payload.cpu()
        return payload.contiguous().view(torch.uint8).reshape(-1)  # a CUDA payload stays there: one copy to the pool
    return torch.from_numpy(np.frombuffer(memoryview(payload).cast("B"), dtype=np.uint8).copy())


__all__ = ["StoreClient", "StoreError", "StoreFullError"]
