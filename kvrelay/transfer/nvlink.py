"""`nvlink`: CUDA IPC between processes on one node (NVLink or PCIe peer access, whatever the GPUs have).

Owns: exporting registered CUDA tensors as CUDA IPC handles (through torch's storage sharing), opening
peers' handles, and the device copies (one ``copy_`` per descriptor on a private stream; a CUDA event
marks completion).  Must not touch: the control plane (endpoint.py), chunk contents.

Without CUDA the transport is unavailable (`unavailable_reason()` says why); the IPC-handle codec
(`encode_ipc_handle` / `decode_ipc_handle`) is plain Python and tested on CPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from kvrelay.transfer.base import Desc, Peer, RegionInfo, XferState
from kvrelay.transfer.buffers import LocalRegion
from kvrelay.transfer.endpoint import Endpoint, PeerConn
from kvrelay.transfer.handle import Handle

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


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(IpcHandle)


def encode_ipc_handle(shared: tuple, tensor_offset: int, nbytes: int) -> bytes:
    """Serialize ``_share_cuda_()``'s 8-tuple with the tensor's byte offset and size."""
    if len(shared) != 8:
        raise ValueError(f"expected the 8 fields of UntypedStorage._share_cuda_(), got {len(shared)}")
    device, handle, size, offset, rc_handle, rc_offset, ev_handle, ev_sync = shared
    if tensor_offset < 0 or nbytes <= 0 or tensor_offset + nbytes > size:
        raise ValueError(f"tensor bytes [{tensor_offset}, {tensor_offset + nbytes}) are outside the shared "
                         f"storage of {size} bytes")
    return _enc.encode(IpcHandle(int(device), bytes(handle), int(size), int(offset), bytes(rc_handle),
                                 int(rc_offset), bytes(ev_handle or b""), bool(ev_sync), tensor_offset, nbytes))


def decode_ipc_handle(data: bytes) -> IpcHandle:
    try:
        return _dec.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"malformed CUDA IPC handle: {exc}") from None


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

    def __init__(self, agent_name: str, compat_hash: str, host: str = "127.0.0.1", port: int = 0,
                 device: int | None = None) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"nvlink transport unavailable: {reason}")
        import torch
        self._torch = torch
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None else device)
        self._stream = torch.cuda.Stream(self.device)
        super().__init__(agent_name, compat_hash, host, port)

    def alloc(self, nbytes: int) -> tuple[RegionInfo, torch.Tensor]:
        self._check_open()
        if nbytes <= 0:
            raise ValueError(f"alloc needs nbytes > 0, got {nbytes}")
        t = self._torch.zeros(nbytes, dtype=self._torch.uint8, device=self.device)
        info = self.register(t)
        return info, t

    def _make_region(self, region_id: int, buf) -> LocalRegion:
        torch = self._torch
        if not isinstance(buf, torch.Tensor) or not buf.is_cuda:
            raise ValueError(f"nvlink registers CUDA tensors only, got {type(buf).__name__}"
                             f"{'' if not isinstance(buf, torch.Tensor) else ' on ' + str(buf.device)}; "
                             f"use the shm transport for host memory")
        if not buf.is_contiguous():
            raise ValueError("cannot register a non-contiguous CUDA tensor: call .contiguous() first")
        flat = buf.view(torch.uint8).reshape(-1)
        storage = flat.untyped_storage()
        meta = encode_ipc_handle(storage._share_cuda_(), flat.storage_offset(), flat.numel())
        return LocalRegion(region_id, memoryview(b""), flat.numel(), device=str(buf.device), meta=meta,
                           keep=[buf], device_obj=flat)

    def _mapped(self, conn: PeerConn, region_id: int) -> torch.Tensor:
        maps: dict = conn.extra.setdefault("maps", {})
        t = maps.get(region_id)
        if t is None:
            torch = self._torch
            h = decode_ipc_handle(conn.peer.region(region_id).meta)
            storage = torch.UntypedStorage._new_shared_cuda(
                h.device, h.handle, h.storage_bytes, h.storage_offset, h.ref_counter_handle, h.ref_counter_offset,
                h.event_handle, h.event_sync_required)
            whole = torch.empty(0, dtype=torch.uint8, device=f"cuda:{h.device}").set_(storage)
            t = maps[region_id] = whole[h.tensor_offset:h.tensor_offset + h.nbytes]
        return t

    def map_remote(self, peer: Peer, region_id: int) -> torch.Tensor:
        """The peer's CUDA region as a uint8 tensor in this process (zero copies)."""
        conn = self._conn(peer)
        if not isinstance(conn, PeerConn):
            raise ValueError(conn)
        return self._mapped(conn, region_id)

    def _device_tensor(self, region_id: int) -> torch.Tensor:
        t = self.local_region(region_id).device_obj
        if t is None:  # cannot happen: every region _make_region registers holds its tensor
            raise ValueError(f"local region {region_id} holds no CUDA tensor")
        return t

    def _peer_lost(self, conn: PeerConn) -> None:
        conn.extra.pop("maps", None)

    def _start(self, conn: PeerConn, op: str, descs: list[Desc], handle: Handle) -> None:
        torch = self._torch
        try:
            with torch.cuda.stream(self._stream):
                for d in descs:
                    local = self._device_tensor(d.local_region)[d.local_offset:d.local_offset + d.length]
                    remote = self._mapped(conn, d.remote_region)[d.remote_offset:d.remote_offset + d.length]
                    dst, src = (local, remote) if op == "read" else (remote, local)
                    dst.copy_(src, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
        except RuntimeError as exc:
            handle.fail(f"CUDA IPC {op} with peer {conn.peer.name!r} failed: {exc}")
            return
        handle.set_transferring()

        def poll() -> None:
            if not handle.done and event.query():
                if self.peer_exited(conn):
                    handle.fail(f"peer {conn.peer.name!r} exited before the {op} finished")
                else:
                    handle.finish(XferState.DONE)

        handle._poll = poll
        poll()
