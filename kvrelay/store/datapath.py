"""How a client's bytes reach the store's pool: mapped shared memory (same host) or a transport.

Owns: `SharedPath` (maps the pool; publish in place, pull by one copy) and `TransportPath` (a local
registered staging region + one-sided read/write of descriptors through a `kvrelay.transfer` endpoint).
Must not touch: the control protocol (client.py) or the pool allocator in the daemon.

GPU clients: `SharedPath` copies a CUDA tensor to and from the pool with ``Tensor.copy_`` on the caller's
current stream (it returns once the copy is done, so it is ordered after the caller's kernels and before
its later ones), and checksums the pool side.  The pool is pinned for them by `pinning.PoolPinner`,
from the first GPU copy (or `use_gpu()`), in the background: a CPU-only client never calls into CUDA.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Executor, Future

import torch

from kvrelay.store.directory import DirectoryReader
from kvrelay.store.pinning import PoolPinner
from kvrelay.store.pool import ALIGN, Arena, SharedPool, align_up
from kvrelay.store.protocol import STORE_COMPAT, Slot  # noqa: F401  (STORE_COMPAT re-exported)
from kvrelay.transfer.wire import ChunkHeader, checksum, copy_into

try:
    from kvrelay import _native
except ImportError:  # not built: SharedPath copies through wire.copy_into
    _native = None  # type: ignore[assignment]  # the name is typed as the module; None: not built


# A batch this large does not stay in the cache for whoever reads it next: store it with non-temporal
# stores (the same rule as the pack kernels' 16 MiB stream threshold, csrc/kvcopy.c).
STREAM_BATCH_BYTES = 16 << 20
# A remote pull_many that verifies keeps this many chunk reads in flight.  All 8 at once measured worse here
# (tcp 1.7 vs 2.3 GB/s, nixl 3.1 vs 3.7 GB/s for 8 x 4 MiB): on two cores the transfers and the checksums
# fight for them; with 2, one chunk is verified while the next moves.
IN_FLIGHT = 2


class SharedPath:
    """Same host: the pool is mapped; slots are tensors aliasing it."""

    name = "shm"

    def __init__(self, pool_name: str, pool_bytes: int, directory: dict | None = None) -> None:
        self.pool = SharedPool(pool_name, pool_bytes)
        self.directory: DirectoryReader | None = None
        if directory:
            try:
                self.directory = DirectoryReader(directory["name"], int(directory["slots"]), self.pool.ident)
            except (OSError, ValueError, KeyError):  # not reachable: every pull asks the daemon
                pass
        tensor = torch.frombuffer(self.pool.mm, dtype=torch.uint8)
        self._tensor: torch.Tensor | None = tensor  # None once closed
        self.base, self.nbytes = tensor.data_ptr(), tensor.numel()
        self.pinner = PoolPinner(self.base, self.nbytes)  # started by the first GPU copy, never in a CPU client

    def use_gpu(self) -> None:
        """This client copies between CUDA memory and the pool (e.g. into `publish_view`s): pin the pool, in
        the background, so those copies are DMA.  Called by the first GPU copy through this path anyway."""
        self.pinner.start()

    @property
    def tensor(self) -> torch.Tensor:
        """The mapped pool as a uint8 tensor (a ValueError once closed)."""
        if self._tensor is None:
            raise ValueError(f"the store pool {self.pool.path} is no longer mapped here (the client closed it)")
        return self._tensor

    def publish_view(self, slot: Slot) -> torch.Tensor:
        return self.tensor[slot.offset:slot.offset + slot.nbytes]

    def flush(self, slot: Slot, view: torch.Tensor, timeout: float) -> None:
        pass  # already in the pool

    def discard(self, view: torch.Tensor) -> None:
        pass

    def pull_many_into(self, slots: list[Slot], outs: list[torch.Tensor], timeout: float,
                       expect: list[int] | None, pool: Executor | None) -> list[int]:
        """Copy each slot into its ``out`` (contiguous, exactly the slot's size); with ``expect``, hash each
        leaf just before its copy (one read of the pool, both native pool threads) and return the indices
        whose checksum differs.  Chunks go one after another: each is already spread over the native pool
        (``pool`` is not needed).  Raw addresses, bounds checked here: no buffer conversions per chunk."""
        bad = []
        want = expect is not None
        stream = sum(s.nbytes for s in slots) >= STREAM_BATCH_BYTES
        for i, (s, out) in enumerate(zip(slots, outs, strict=True)):
            got = self._copy(s, out, "an output", to_pool=False, want=want, stream=stream)
            if expect is not None and got != expect[i]:
                bad.append(i)
        return bad

    def pull_local(self, kid: str, out: torch.Tensor, verify: bool, check_live: bool = True) -> ChunkHeader | None:
        """Pull a ready in-memory chunk through the shared directory, with no round trip: copy it into ``out``
        (with the checksum verified in the same pass) and return its header; None when the directory does not
        hold it, the daemon rewrote its row during the copy (evicted, deleted), ``out`` is too small, or the
        checksum differs: the caller then asks the daemon, which waits, pins, and reports corruption."""
        d = self.directory
        if d is None:
            return None
        found = d.find(kid, check_live)
        if found is None:
            return None
        row, seq, offset, header = found
        if out.numel() < header.nbytes or offset < 0 or offset + header.nbytes > self.nbytes:
            return None
        got = self._copy(Slot(offset, header.nbytes), out[:header.nbytes], "an output", to_pool=False,
                         want=verify, stream=False)
        if not d.still(row, seq) or (verify and got != header.checksum):
            return None
        return header

    def publish_into(self, slot: Slot, src: torch.Tensor) -> int | None:
        """Copy ``src`` (contiguous uint8, the slot's size) into the slot with non-temporal stores (nobody reads
        a pool slot soon) and return the checksum of the bytes copied (each leaf hashed just before its copy)."""
        return self._copy(slot, src, "a payload", to_pool=True, want=True, stream=True)

    def _copy(self, s: Slot, t: torch.Tensor, what: str, *, to_pool: bool, want: bool, stream: bool) -> int | None:
        """Copy between slot ``s`` and tensor ``t`` (contiguous uint8, the slot's size) by raw address, bounds
        checked here; with ``want``, return the checksum of the bytes copied."""
        if s.offset < 0 or s.offset + s.nbytes > self.nbytes or t.numel() != s.nbytes:
            raise ValueError(f"slot [{s.offset}, +{s.nbytes}) outside the {self.nbytes}-byte pool, or {what} "
                             f"of {t.numel()} bytes")
        if t.device.type != "cpu":  # a GPU client: a device copy on its current stream, the checksum pool-side
            self.use_gpu()
            view = self.tensor[s.offset:s.offset + s.nbytes]
            if to_pool:
                view.copy_(t)  # device -> host: returns once the bytes are in the pool
                return checksum(view) if want else None
            got = checksum(view) if want else None  # hashed before the copy, as the CPU path does
            t.copy_(view)
            return got
        if _native is None:  # not built: through the buffer protocol (slower per call, same bytes)
            view = self.tensor[s.offset:s.offset + s.nbytes]
            return copy_into(view, t, want, stream) if to_pool else copy_into(t, view, want, stream)
        if to_pool:
            return _native.copy_addr(self.base + s.offset, t.data_ptr(), s.nbytes, want, stream)
        return _native.copy_addr(t.data_ptr(), self.base + s.offset, s.nbytes, want, stream)

    def register_buffer(self, buf: torch.Tensor) -> None:
        pass  # the pool is mapped: nothing to register

    def close(self) -> None:
        if self.directory is not None:
            self.directory.close()
        self.pinner.close()  # no CUDA call unless this client pinned
        self._tensor = None
        self.pool.close()


class TransportPath:
    """Another host (or any transport): stage locally, move with one-sided transfers."""

    def __init__(self, transport: str, agent_name: str, endpoint: dict, staging_bytes: int,
                 timeout: float) -> None:
        from kvrelay.transfer import create_transport
        self.name = transport
        self.t = create_transport(transport, agent_name, STORE_COMPAT, "127.0.0.1", 0)
        self.staging = torch.zeros(align_up(staging_bytes), dtype=torch.uint8)
        self.local_region = self.t.register(self.staging).region_id
        self.remote_region = int(endpoint["region_id"])
        self.peer = self.t.connect(endpoint["address"], timeout=timeout)
        self.arena = Arena(self.staging.numel())
        self.lock = threading.Lock()
        self._views: dict[int, tuple[int, int]] = {}  # data_ptr -> (offset, nbytes)
        self._user: list[tuple[int, int, int, torch.Tensor]] = []  # (start ptr, nbytes, region id, tensor)

    def _alloc(self, nbytes: int) -> torch.Tensor:
        with self.lock:
            off = self.arena.alloc(nbytes)
        if off is None:
            raise ValueError(f"client staging region of {self.arena.capacity} bytes is full ({nbytes} more "
                             f"needed); pass a larger staging_bytes to StoreClient or commit sooner")
        view = self.staging[off:off + nbytes]
        self._views[view.data_ptr()] = (off, nbytes)
        return view

    def publish_view(self, slot: Slot) -> torch.Tensor:
        return self._alloc(slot.nbytes)

    def discard(self, view: torch.Tensor) -> None:
        loc = self._views.pop(view.data_ptr(), None)
        if loc is not None:
            with self.lock:
                self.arena.free(*loc)

    def flush(self, slot: Slot, view: torch.Tensor, timeout: float) -> None:
        from kvrelay.transfer.base import Desc
        off, n = self._views[view.data_ptr()]
        try:
            with self.t.write(self.peer, [Desc(self.local_region, off, self.remote_region, slot.offset, n)],
                              timeout=timeout) as h:
                h.result(timeout)
        finally:
            self.discard(view)

    def use_gpu(self) -> None:
        pass  # staging is host memory the transport registered; device copies go through it

    def register_buffer(self, buf: torch.Tensor) -> None:
        """Register a long-lived uint8 CPU tensor so pulls into it skip the staging copy."""
        if buf.dtype != torch.uint8 or buf.device.type != "cpu" or not buf.is_contiguous():
            raise ValueError(f"register_buffer needs a contiguous uint8 CPU tensor, got {buf.dtype} on {buf.device}")
        region = self.t.register(buf)
        with self.lock:
            self._user.append((buf.data_ptr(), buf.numel(), region.region_id, buf))

    def _registered(self, out: torch.Tensor) -> tuple[int, int] | None:
        p, n = out.data_ptr(), out.numel()
        for start, size, region, _ in self._user:
            if start <= p and p + n <= start + size:
                return region, p - start
        return None

    def pull_into(self, slot: Slot, out: torch.Tensor, timeout: float) -> None:
        from kvrelay.transfer.base import Desc
        direct = self._registered(out)
        if direct is not None:  # straight into the caller's registered memory
            with self.t.read(self.peer, [Desc(direct[0], direct[1], self.remote_region, slot.offset, slot.nbytes)],
                             timeout=timeout) as h:
                h.result(timeout)
            return
        view = self._alloc(slot.nbytes)
        off = self._views[view.data_ptr()][0]
        try:
            with self.t.read(self.peer, [Desc(self.local_region, off, self.remote_region, slot.offset, slot.nbytes)],
                             timeout=timeout) as h:
                h.result(timeout)
            out.copy_(view)
        finally:
            self.discard(view)

    def pull_many_into(self, slots: list[Slot], outs: list[torch.Tensor], timeout: float,
                       expect: list[int] | None, pool: Executor | None) -> list[int]:
        """Outs in registered memory move straight there, the others one by one through staging.  Without
        checksums (or a ``pool``), the direct ones move in ONE transfer of many descriptors.  With both, they
        move one chunk per transfer, IN_FLIGHT at a time, and each chunk's checksum runs on ``pool`` while the
        next chunk moves (verification hidden behind the transfers).  Returns the indices whose checksum differs."""
        from kvrelay.transfer.base import Desc
        deadline = time.monotonic() + timeout
        left = lambda: max(0.1, deadline - time.monotonic())  # noqa: E731
        direct, rest = [], []
        for i, (slot, out) in enumerate(zip(slots, outs, strict=True)):
            reg = self._registered(out)
            if reg is None:
                rest.append(i)
            else:
                direct.append((i, Desc(reg[0], reg[1], self.remote_region, slot.offset, slot.nbytes)))
        sums: dict[int, Future] = {}
        if direct and expect is not None and pool is not None and len(direct) > 1:
            handles = []  # IN_FLIGHT reads at a time, taken in order; each chunk verified while the next moves
            try:
                nxt = 0
                for j, (i, _) in enumerate(direct):
                    while nxt < len(direct) and nxt < j + IN_FLIGHT:
                        handles.append((direct[nxt][0], self.t.read(self.peer, [direct[nxt][1]], timeout=left())))
                        nxt += 1
                    handles[j][1].result(left())
                    sums[i] = pool.submit(checksum, outs[i])
            finally:
                for _, h in handles:
                    h.release()
        elif direct:
            with self.t.read(self.peer, [d for _, d in direct], timeout=left()) as h:
                h.result(left())
        host_sums: dict[int, int] = {}
        for i in rest:
            if outs[i].device.type == "cpu":
                self.pull_into(slots[i], outs[i], left())
                continue
            host = torch.empty(slots[i].nbytes, dtype=torch.uint8)  # a GPU out: verified in host memory
            self.pull_into(slots[i], host, left())
            if expect is not None:
                host_sums[i] = checksum(host)
            outs[i].copy_(host)
        if expect is None:
            return []
        return [i for i in range(len(outs))
                if (sums[i].result() if i in sums else host_sums[i] if i in host_sums else checksum(outs[i])) != expect[i]]

    def close(self) -> None:
        self.t.close()


__all__ = ["SharedPath", "TransportPath", "STORE_COMPAT", "ALIGN"]
