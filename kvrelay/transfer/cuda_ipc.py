"""The CUDA logic under the nvlink transport, written against an injected ``torch.cuda``-like module so that
CPU tests drive it with recording fakes (the real module runs it on GPUs).

Owns:
  * `device_index_for_uuid`: which local device index a peer's GPU has here.  Indices are per process
    (CUDA_VISIBLE_DEVICES renumbers), so a region names its GPU by UUID, never by index.
  * `IpcMaps`: the peer regions this endpoint opened, one open per (peer, epoch, region) however many
    transfers use it, closed when the last user lets go: the map itself (until the owner deregisters the
    region, or the peer is lost) and every copy still in flight on it.
  * `CopyStream`: the private stream the copies run on, ordered after the caller's current stream
    (an event recorded there, waited on by the copy stream) and before the caller's later work (the caller's
    stream waits on the copies' event when the handle completes); the copies in flight, each holding its
    maps until its event has passed, so a lost peer's handles are never closed under a running copy; and
    CUDA errors (sticky ones included) turned into a reason string instead of an exception out of `wait()`.
Must not touch: the control plane, descriptors, handles' states (nvlink.py maps results onto them).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any


def device_index_for_uuid(uuid: str, local_uuids: Sequence[str]) -> int:
    """The index here of the GPU whose UUID is ``uuid`` (ValueError naming the visible ones if it is not)."""
    want = _norm_uuid(uuid)
    for i, u in enumerate(local_uuids):
        if _norm_uuid(u) == want:
            return i
    raise ValueError(f"the peer's GPU {uuid} is not visible in this process (visible: "
                     f"{', '.join(local_uuids) or 'none'}); check CUDA_VISIBLE_DEVICES on both sides")


def _norm_uuid(u: str) -> str:
    u = str(u).strip().lower()
    return u[4:] if u.startswith("gpu-") else u


def local_uuids(cuda: Any) -> list[str]:
    """UUIDs of the devices this process sees, in its own index order."""
    return [str(cuda.get_device_properties(i).uuid) for i in range(cuda.device_count())]


class IpcMaps:
    """Refcounted opened IPC regions.  ``opener(arg)`` maps one (returns what copies use; ``arg`` is what
    the first `acquire` of its key passed: the region's metadata); ``closer(obj)`` unmaps it.  The map holds one reference until `retire`; each `acquire` adds one, each `release` drops one;
    the region is closed when none is left."""

    def __init__(self, opener: Callable[[Any], Any], closer: Callable[[Any], None]) -> None:
        self._opener, self._closer = opener, closer
        self._lock = threading.Lock()
        self._open: dict[Hashable, list] = {}  # key -> [obj, refs, retired]
        self.opens = self.closes = 0

    def acquire(self, key: Hashable, arg: Any = None) -> Any:
        with self._lock:
            entry = self._open.get(key)
            if entry is None:
                entry = self._open[key] = [self._opener(arg), 1, False]  # the map's own reference
                self.opens += 1
            entry[1] += 1
            return entry[0]

    def release(self, key: Hashable) -> None:
        self._drop(key, retire=False)

    def retire(self, key: Hashable) -> None:
        """The region is gone (deregistered by its owner, or its peer lost): close it once no copy uses it."""
        self._drop(key, retire=True)

    def retire_where(self, match: Callable[[Any], bool]) -> None:
        with self._lock:
            keys = [k for k, e in self._open.items() if not e[2] and match(k)]
        for k in keys:
            self.retire(k)

    def _drop(self, key: Hashable, retire: bool) -> None:
        with self._lock:
            entry = self._open.get(key)
            if entry is None or (retire and entry[2]):
                return
            if retire:
                entry[2] = True
            entry[1] -= 1
            if entry[1] > 0:
                return
            del self._open[key]
            self.closes += 1
        self._closer(entry[0])

    def refs(self, key: Hashable) -> int:
        entry = self._open.get(key)
        return 0 if entry is None else entry[1]

    def __len__(self) -> int:
        return len(self._open)


class CopyStream:
    """Copies on a private stream of ``device``, ordered with the caller's current stream."""

    def __init__(self, cuda: Any, device: Any, maps: IpcMaps) -> None:
        self.cuda, self.device, self.maps = cuda, device, maps
        self.stream = cuda.Stream(device)
        self._lock = threading.Lock()
        self._inflight: list[tuple[Any, list[Hashable]]] = []  # (done event, map keys it holds)

    def post(self, copies: Callable[[], None], keys: list[Hashable]) -> Any:
        """Run ``copies()`` (which issues the device copies) on the private stream once everything already
        queued on the caller's current stream is done; return the event that marks the copies' end.  The
        ``keys`` (acquired by the caller) are released when that event has passed (`reap`)."""
        cuda = self.cuda
        ready = cuda.Event()
        ready.record(cuda.current_stream(self.device))  # e.g. the pack kernel that filled the source
        self.stream.wait_event(ready)
        with cuda.stream(self.stream):
            try:
                copies()
            finally:  # even after a failed copy, the ones issued before it hold their maps until they end
                done = cuda.Event()
                done.record(self.stream)
                with self._lock:
                    self._inflight.append((done, keys))
        return done

    def check(self, done: Any) -> tuple[bool, str | None]:
        """(finished, CUDA error or None) for a posted batch, without raising.  On success the caller's
        current stream is made to wait on it, so its later kernels (an unpack) see the bytes."""
        try:
            if not done.query():
                return False, None
            self.cuda.current_stream(self.device).wait_event(done)
        except RuntimeError as exc:  # torch raises CUDA errors (sticky ones too) as RuntimeError
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return True, first if first.startswith("CUDA error") else f"CUDA error: {first}"
        return True, None

    def reap(self) -> None:
        """Release the maps of every batch whose event has passed (or whose stream hit a CUDA error)."""
        with self._lock:
            keep: list[tuple[Any, list[Hashable]]] = []
            done: list[tuple[Any, list[Hashable]]] = []
            for ev, keys in self._inflight:
                try:
                    finished = ev.query()
                except RuntimeError:
                    finished = True  # the context is broken: nothing will run any more
                (done if finished else keep).append((ev, keys))
            self._inflight = keep
        for _, keys in done:
            for k in keys:
                self.maps.release(k)

    def drain(self) -> None:
        """Wait for every batch in flight, then release their maps (endpoint close)."""
        with self._lock:
            batches, self._inflight = self._inflight, []
        for ev, keys in batches:
            try:
                ev.synchronize()
            except RuntimeError:
                pass
            for k in keys:
                self.maps.release(k)

    def inflight(self) -> int:
        return len(self._inflight)


def host_wait_for_stream(cuda: Any, device: Any) -> None:
    """Block this thread until the work queued so far on the caller's current stream of ``device`` is done
    (an event recorded there, then synchronized: not a whole-device sync).  For transfers that are not
    stream-ordered (NIXL posts from the host): the producer's kernels must have written the source, and the
    consumer's kernels must be done reading a destination, before the transfer is posted."""
    ev = cuda.Event()
    ev.record(cuda.current_stream(device))
    ev.synchronize()
