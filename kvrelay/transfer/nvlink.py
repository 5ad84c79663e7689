"""`nvlink`: CUDA IPC between processes on one node (NVLink or PCIe peer access, whatever the GPUs have).

Owns: exporting registered CUDA tensors as CUDA IPC handles (through torch's storage sharing), opening
peers' handles, and the device copies (one ``copy_`` per descriptor on a private stream; a CUDA event
marks completion: `NvlinkMover`, the transport's data mover, mover.py).  Must not touch: the control plane
(control_plane.py), chunk contents.

Ordering (cuda_ipc.CopyStream): the copies start after everything already queued on the caller's current
stream (a pack before a write is never sent stale), and a completed handle makes the caller's current
stream wait on the copies (an unpack after a read sees the bytes; a reused buffer is not overwritten under
a kernel still reading it).  No host-side synchronisation per call.
Lifetimes (cuda_ipc.IpcMaps): a peer region is opened once per (peer, epoch, region) and closed when the
last user lets go: the map (until the owner deregisters it, announced by an Unmap message, or the peer is
lost) and every copy in flight on it, so a dying peer's handles are not closed under a running copy.
torch's CUDA IPC reference counter: the owner shares each region once (the counter starts at 1) and drops
that count itself at deregister; importers open with no counter, so neither no importer (the block stayed
in torch's limbo forever) nor several (the counter went negative and freed the block under the others)
leaks or corrupts.  GPUs are matched by UUID, not index (CUDA_VISIBLE_DEVICES renumbers them).
Errors: a CUDA error (a sticky one included) fails the handle with a TransferError, never escapes `wait()`.

Without CUDA the transport is unavailable (`unavailable_reason()` says why); the IPC-handle codec and the
logic in cuda_ipc.py are plain Python and tested on CPU with fakes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from kvrelay.transfer.base import Peer, RegionInfo, XferState
from kvrelay.transfer.buffers import LocalRegion
from kvrelay.transfer.cuda_ipc import CopyStream, IpcMaps, device_index_for_uuid, local_uuids
from kvrelay.transfer.control import PeerConn
from kvrelay.transfer.endpoint import Endpoint
from kvrelay.transfer.handle import Handle
from kvrelay.transfer.mover import DataMover, Transfer

if TYPE_CHECKING:
    import torch


class IpcHandle(msgspec.Struct, array_like=True):
    """What torch's ``UntypedStorage._share_cuda_()`` returns, plus where the tensor sits in it."""

    device: int
    handle: bytes
    storage_bytes: int
    storage_offset: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    tensor_offset: int  # byte offset of the registered tensor inside the storage
    nbytes: int
    uuid: str = ""  # the GPU's UUID (its index differs between processes)


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(IpcHandle)


def encode_ipc_handle(shared: tuple, tensor_offset: int, nbytes: int, uuid: str = "") -> bytes:
    """Serialize ``_share_cuda_()``'s 8-tuple with the tensor's byte offset and size and the GPU's UUID."""
    if len(shared) != 8:
        raise ValueError(f"expected the 8 fields of UntypedStorage._share_cuda_(), got {len(shared)}")
    device, handle, size, offset, rc_handle, rc_offset, ev_handle, ev_sync = shared
    if tensor_offset < 0 or nbytes <= 0 or tensor_offset + nbytes > size:
        raise ValueError(f"tensor bytes [{tensor_offset}, {tensor_offset + nbytes}) are outside the shared "
                         f"storage of {size} bytes")
    return _enc.encode(IpcHandle(int(device), bytes(handle), int(size), int(offset), bytes(rc_handle),
                                 int(rc_offset), bytes(ev_handle or b""), bool(ev_sync), tensor_offset, nbytes,
                                 str(uuid)))


def decode_ipc_handle(data: bytes) -> IpcHandle:
    try:
        return _dec.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"malformed CUDA IPC handle: {exc}") from None


# importers open regions with this reference-counter name, which names no counter: torch's decrement at
# close finds nothing and is skipped (the owner keeps the one count it made, see the module docstring)
NO_IPC_COUNTER = b"/kvrelay-no-ipc-counter"


def unavailable_reason() -> str | None:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False): CUDA IPC needs GPUs"
    return None


class NvlinkTransport(Endpoint):
    name = "nvlink"
    announce_unmap = True

    def __init__(self, agent_name: str, compat_hash: str, host: str = "127.0.0.1", port: int = 0,
                 device: int | None = None) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"nvlink transport unavailable: {reason}")
        import torch
        self._torch = torch
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None else device)
        self._uuids = local_uuids(torch.cuda)
        self._maps = IpcMaps(self._open_region, lambda t: None)  # the last reference dropped unmaps it
        self._copies = CopyStream(torch.cuda, self.device, self._maps)
        self._shares: dict[int, tuple[bytes, int]] = {}  # region id -> torch's IPC counter (handle, offset)
        super().__init__(agent_name, compat_hash, host, port)

    def _data_mover(self) -> DataMover:
        return NvlinkMover(self._maps, self._copies, self._regions)

    def alloc(self, nbytes: int) -> tuple[RegionInfo, torch.Tensor]:
        self._check_open()
        if nbytes <= 0:
            raise ValueError(f"alloc needs nbytes > 0, got {nbytes}")
        t = self._torch.zeros(nbytes, dtype=self._torch.uint8, device=self.device)
        info = self.register(t)
        return info, t

    # -- the owner's side ------------------------------------------------------------------------
    def _make_region(self, region_id: int, buf) -> LocalRegion:
        torch = self._torch
        if not isinstance(buf, torch.Tensor) or not buf.is_cuda:
            raise ValueError(f"nvlink registers CUDA tensors only, got {type(buf).__name__}"
                             f"{'' if not isinstance(buf, torch.Tensor) else ' on ' + str(buf.device)}; "
                             f"use the shm transport for host memory")
        if not buf.is_contiguous():
            raise ValueError("cannot register a non-contiguous CUDA tensor: call .contiguous() first")
        flat = buf.view(torch.uint8).reshape(-1)
        if flat.numel() == 0:
            raise ValueError("cannot register an empty CUDA tensor")
        uuid = str(torch.cuda.get_device_properties(buf.device).uuid)
        shared = flat.untyped_storage()._share_cuda_()  # one share: torch's counter starts at 1, ours
        try:
            meta = encode_ipc_handle(shared, flat.storage_offset(), flat.numel(), uuid)
        except ValueError:
            torch.UntypedStorage._release_ipc_counter_cuda(bytes(shared[4]), int(shared[5]))
            raise
        self._shares[region_id] = (bytes(shared[4]), int(shared[5]))
        return LocalRegion(region_id, memoryview(b""), flat.numel(), device=str(buf.device), meta=meta,
                           keep=[buf], device_obj=flat)

    def _drop_region(self, region: LocalRegion) -> None:
        share = self._shares.pop(region.region_id, None)
        if share is not None:  # drop our count: the block is freed with the tensor, not kept in torch's limbo
            self._torch.UntypedStorage._release_ipc_counter_cuda(*share)

    # -- the importer's side ---------------------------------------------------------------------
    def _open_region(self, meta: bytes) -> torch.Tensor:
        torch = self._torch
        h = decode_ipc_handle(meta)
        index = device_index_for_uuid(h.uuid, self._uuids) if h.uuid else h.device
        storage = torch.UntypedStorage._new_shared_cuda(
            index, h.handle, h.storage_bytes, h.storage_offset, NO_IPC_COUNTER, 0, h.event_handle,
            h.event_sync_required)
        whole = torch.empty(0, dtype=torch.uint8, device=f"cuda:{index}").set_(storage)
        return whole[h.tensor_offset:h.tensor_offset + h.nbytes]

    def map_remote(self, peer: Peer, region_id: int) -> torch.Tensor:
        """The peer's CUDA region as a uint8 tensor in this process (zero copies).  Valid while held; its
        contents are undefined once the owner deregisters the region."""
        conn = self._conn(peer)
        if not isinstance(conn, PeerConn):
            raise ValueError(conn)
        key = _key(conn, region_id)
        t = self._maps.acquire(key, conn.peer.region(region_id).meta)
        self._maps.release(key)  # the map's own reference keeps it open
        return t

    def open_maps(self) -> int:
        """Peer regions mapped in this process (a leak counter for tests)."""
        return len(self._maps)


def _key(conn: PeerConn, region_id: int) -> tuple[str, str, int]:
    return (conn.peer.name, conn.peer.info.epoch, region_id)


class NvlinkMover(DataMover):
    """The device copies: peers' regions opened through ``maps``, copies posted on ``copies``' private
    stream, a handle's driver polling the copies' event."""

    def __init__(self, maps: IpcMaps, copies: CopyStream, regions: dict[int, LocalRegion]) -> None:
        self._maps = maps
        self._copies = copies
        self._regions = regions  # the endpoint's local regions (read only)

    def _device_tensor(self, region_id: int) -> torch.Tensor:
        region = self._regions.get(region_id)
        if region is None:
            raise ValueError(f"local region {region_id} is not registered")
        t = region.device_obj
        if t is None:  # cannot happen: every region _make_region registers holds its tensor
            raise ValueError(f"local region {region_id} holds no CUDA tensor")
        return t

    def peer_lost(self, conn: PeerConn) -> None:
        name, epoch = conn.peer.name, conn.peer.info.epoch
        self._maps.retire_where(lambda k: k[0] == name and k[1] == epoch)  # closed once no copy uses them
        self._copies.reap()

    def peer_region_gone(self, conn: PeerConn, region_id: int) -> None:
        self._maps.retire(_key(conn, region_id))
        self._copies.reap()

    def start(self, xfer: Transfer) -> Handle:
        conn, op = xfer.conn, xfer.op
        self._copies.reap()
        views: dict[tuple[str, str, int], torch.Tensor] = {}  # one reference per region for this batch
        pairs = []
        try:
            for d in xfer.descs:
                key = _key(conn, d.remote_region)
                if key not in views:
                    views[key] = self._maps.acquire(key, conn.peer.region(d.remote_region).meta)
                local = self._device_tensor(d.local_region)[d.local_offset:d.local_offset + d.length]
                remote = views[key][d.remote_offset:d.remote_offset + d.length]
                pairs.append((local, remote) if op == "read" else (remote, local))
        except (RuntimeError, ValueError) as exc:
            for key in views:
                self._maps.release(key)
            handle = xfer.open()
            handle.fail(f"CUDA IPC {op} with peer {conn.peer.name!r} failed: {exc}")
            return handle

        def copies() -> None:
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
        try:
            done = self._copies.post(copies, list(views))  # the maps are the batch's until its event passes
        except RuntimeError as exc:
            handle = xfer.open()
            handle.fail(f"CUDA IPC {op} with peer {conn.peer.name!r} failed: CUDA error: {exc}")
            return handle
        handle = xfer.open(poll=lambda: self._poll(conn, op, done, handle))
        handle.set_transferring()
        self._poll(conn, op, done, handle)
        return handle

    def _poll(self, conn: PeerConn, op: str, done, handle: Handle) -> None:
        if handle.done:
            return
        finished, error = self._copies.check(done)
        if not finished:
            return
        self._copies.reap()
        if error is not None:
            handle.fail(f"nvlink {op} with peer {conn.peer.name!r} failed: {error} (a sticky CUDA error leaves "
                        f"this process's CUDA context unusable: restart it)")
        elif conn.exited():
            handle.fail(f"peer {conn.peer.name!r} exited before the {op} finished")
        else:
            handle.finish(XferState.DONE)

    def close(self) -> None:
        self._copies.drain()  # the copies in flight end before their maps close
