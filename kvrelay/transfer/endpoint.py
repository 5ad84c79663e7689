"""What every transport endpoint shares: local regions, the descriptor checks, and the composition of parts.

Owns: local region bookkeeping (register, alloc, deregister), the transfer entry point (`read`/`write`:
the peer lookup and the descriptor checks, then the same-host fast path or the data mover), and the
endpoint's lifecycle.  It is composed of:
  * `ControlPlane` (control_plane.py): the control socket, handshake, peers and their liveness, notifications;
  * `HandleTable` (handles.py): every open handle, the deadline sweep, leak counts;
  * a `DataMover` (mover.py), the transport's one interface for moving bytes, and optionally its
    `SameHostPath` for one small descriptor.
Must not touch: how bytes move (the data mover), chunk contents.

Transport hooks (a subclass implements `_data_mover` and describes its memory; everything else has a default):
  * ``_data_mover()``        the transport's `DataMover`, built once before the control thread starts (the
                             endpoint's ``_ctx``, ``keys``, ``_regions`` and ``_handles`` exist by then);
  * ``_same_host_path()``    its `SameHostPath`, or None (default);
  * ``_make_region(id, buf)`` / ``_drop_region(region)``: what registering memory means to the transport;
  * ``_agent_meta()``        transport metadata in the handshake (NIXL agent metadata, a data address);
  * ``_reachable(region)`` / ``_validate(peer, op, descs)``: which peer regions may be a remote side;
  * ``_peer_added(conn)``, ``_peer_lost(conn)``, ``_peer_region_gone(conn, region_id)``: the control plane's
    peer events; by default each goes to the data mover (a transport implements them there).

Thread safety: as documented on `Transport`.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import TYPE_CHECKING, Sequence

import numpy as np

from kvrelay.transfer.base import (DEFAULT_TIMEOUT_S, AgentInfo, Desc, Notification, Peer, RegionInfo, Transport,
                                   XferHandle, XferState, check_descs)
from kvrelay.transfer.buffers import LocalRegion, byte_view
from kvrelay.transfer.control import PeerConn
from kvrelay.transfer.control_plane import ControlPlane, PeerEvents
from kvrelay.transfer.handle import Handle
from kvrelay.transfer.handles import HandleTable
from kvrelay.transfer.mover import DataMover, SameHostPath, Transfer

if TYPE_CHECKING:
    import torch

__all__ = ["Endpoint", "HOSTNAME"]

HOSTNAME = socket.gethostname()


class Endpoint(Transport):
    def __init__(self, agent_name: str, compat_hash: str, host: str = "127.0.0.1", port: int = 0) -> None:
        if not agent_name:
            raise ValueError("agent_name must be a non-empty string")
        if not (0 <= int(port) < 65536):
            raise ValueError(f"port must be in [0, 65535], got {port}")
        super().__init__(agent_name, compat_hash, host, port)
        self._lock = threading.RLock()  # regions and their ids
        self._regions: dict[int, LocalRegion] = {}
        self._next_region = 1
        self._closed = False
        self._handles = HandleTable()
        self._plane = ControlPlane(self.name, agent_name, host, port, self.info, self._handles, HOSTNAME)
        self.port = self._plane.port
        self.keys = self._plane.keys
        self._ctx = self._plane.ctx
        self._peers = self._plane.peers  # the plane's dict (read without a lock on the transfer path)
        try:
            self._mover: DataMover = self._data_mover()
            self._fast: SameHostPath | None = self._same_host_path()
        except BaseException:
            self._plane.close()
            raise
        self._plane.start(PeerEvents(self._peer_added, self._peer_lost, self._peer_region_gone))

    # -- identity --------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def info(self) -> AgentInfo:
        with self._lock:
            regions = [RegionInfo(r.region_id, r.nbytes, r.device, r.meta) for r in self._regions.values()]
        return AgentInfo(name=self.agent_name, epoch=self.epoch, transport=self.name, compat_hash=self.compat_hash,
                         address=self.address, regions=regions, meta=self._agent_meta(), pid=os.getpid(),
                         hostname=HOSTNAME)

    # -- regions ---------------------------------------------------------------------------------
    def _new_region_id(self) -> int:
        with self._lock:
            rid = self._next_region
            self._next_region += 1
        return rid

    def _add_region(self, region: LocalRegion) -> RegionInfo:
        with self._lock:
            self._regions[region.region_id] = region
        return RegionInfo(region.region_id, region.nbytes, region.device, region.meta)

    def register(self, buf) -> RegionInfo:
        self._check_open()
        return self._add_region(self._make_region(self._new_region_id(), buf))

    def alloc(self, nbytes: int) -> tuple[RegionInfo, memoryview | torch.Tensor]:
        """Allocate ``nbytes`` of memory suited to this transport, register it, return it (zeroed).  Host
        memory here; a subclass for device memory (nvlink) returns a tensor."""
        self._check_open()
        if nbytes <= 0:
            raise ValueError(f"alloc needs nbytes > 0, got {nbytes}")
        arr = np.zeros(nbytes, dtype=np.uint8)
        info = self.register(arr)
        return info, self._regions[info.region_id].view

    def deregister(self, region_id: int) -> None:
        with self._lock:
            region = self._regions.pop(region_id, None)
        if region is None:
            raise ValueError(f"region {region_id} is not registered on {self.agent_name!r}")
        if self.announce_unmap:
            self._plane.announce_unmap(self.epoch, region_id)
        self._drop_region(region)

    # peers are told of a deregistration (an Unmap message), so they drop the region and unmap it (nvlink)
    announce_unmap = False

    def local_region(self, region_id: int) -> LocalRegion:
        region = self._regions.get(region_id)
        if region is None:
            raise ValueError(f"local region {region_id} is not registered on {self.agent_name!r}")
        return region

    # -- peers -----------------------------------------------------------------------------------
    def connect(self, address: str, timeout: float = DEFAULT_TIMEOUT_S) -> Peer:
        self._check_open()
        return self._plane.connect(address, timeout)

    def disconnect(self, peer: Peer) -> None:
        self._plane.disconnect(peer)

    def peers(self) -> list[Peer]:
        return self._plane.live_peers()

    def _conn(self, peer: Peer) -> PeerConn | str:
        """The live connection for ``peer``, or the reason there is none."""
        return self._plane.conn(peer)

    # -- transfers -------------------------------------------------------------------------------
    def read(self, peer: Peer, descs: Sequence[Desc], timeout: float = DEFAULT_TIMEOUT_S) -> XferHandle:
        return self._transfer("read", peer, descs, timeout)

    def write(self, peer: Peer, descs: Sequence[Desc], timeout: float = DEFAULT_TIMEOUT_S) -> XferHandle:
        return self._transfer("write", peer, descs, timeout)

    def _transfer(self, op: str, peer: Peer, descs: Sequence[Desc], timeout: float) -> Handle:
        # The hot path of every transfer: a few microseconds per descriptor matter at 4 KiB.
        if self._closed:
            self._check_open()
        conn = self._peers.get(peer.name)
        if conn is not None and conn.alive and conn.peer.info.epoch == peer.info.epoch:
            fast = self._fast
            if fast is not None and type(descs) in (list, tuple) and len(descs) == 1:
                handle = fast.transfer_one(conn, op, descs[0], timeout)
                if handle is not None:
                    return handle
            if type(descs) is not list:
                descs = list(descs)
            nbytes = self._checked_bytes(conn, descs)
            if nbytes > 0:
                return self._mover.start(Transfer(self._handles, conn, op, descs, nbytes, timeout))
        return self._transfer_checked(op, peer, list(descs), timeout)

    def _transfer_checked(self, op: str, peer: Peer, descs: list[Desc], timeout: float) -> Handle:
        """The general path: a stale or lost peer, no bytes, or descriptors the fast check did not accept
        (the full checks raise ValueError naming the culprit)."""
        conn = self._plane.conn(peer)
        nbytes = self._checked_bytes(conn, descs) if isinstance(conn, PeerConn) else -1
        if nbytes < 0:
            info_peer = conn.peer if isinstance(conn, PeerConn) else peer
            check_descs(descs, {rid: r.nbytes for rid, r in list(self._regions.items())}, info_peer)
            self._validate(info_peer, op, descs)
            nbytes = sum(d.length for d in descs)
        if not isinstance(conn, PeerConn):
            handle = self._handles.open(peer.name, op, nbytes, timeout, None)
            handle.fail(conn)
        elif nbytes == 0:
            handle = self._handles.open(peer.name, op, nbytes, timeout, conn)
            handle.finish(XferState.DONE)
        else:
            handle = self._mover.start(Transfer(self._handles, conn, op, descs, nbytes, timeout))
        return handle

    def _checked_bytes(self, conn: PeerConn, descs: list[Desc]) -> int:
        """The descriptors' total length if every one is inside a local region and a remote region this
        transport can reach; -1 otherwise (then `check_descs` and `_validate` say what is wrong)."""
        regions = self._regions
        remote = conn.sizes_for(self._reachable)
        total = 0
        for d in descs:
            n = d.length
            local = regions.get(d.local_region)
            size = remote.get(d.remote_region)
            if (local is None or size is None or n < 0 or d.local_offset < 0 or d.remote_offset < 0
                    or d.local_offset + n > local.nbytes or d.remote_offset + n > size):
                return -1
            total += n
        return total

    def open_handles(self) -> int:
        """Handles not yet released (a leak counter for tests and metrics)."""
        return len(self._handles)

    # -- notifications ---------------------------------------------------------------------------
    def notify(self, peer: Peer, payload: bytes) -> None:
        self._plane.notify(peer, self.epoch, payload)

    def get_notifications(self, timeout: float = 0.0) -> list[Notification]:
        return self._plane.get_notifications(timeout)

    # -- lifecycle -------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.name} endpoint {self.agent_name!r} is closed")

    def close(self) -> None:
        if self._closed:
            return
        conns = self._plane.say_goodbye(self.epoch)
        self._handles.release_all()
        for conn in conns:
            self._plane.lose(conn, f"endpoint {self.agent_name!r} closed", drop=True)
        self._closed = True
        self._plane.stop()
        self._mover.close()
        for region in list(self._regions.values()):
            self._drop_region(region)
        self._regions.clear()
        self._plane.close()

    # -- hooks -----------------------------------------------------------------------------------
    def _data_mover(self) -> DataMover:
        raise NotImplementedError(f"{type(self).__name__} must provide its data mover")

    def _same_host_path(self) -> SameHostPath | None:
        return None

    def _peer_added(self, conn: PeerConn) -> None:
        self._mover.peer_added(conn)

    def _peer_lost(self, conn: PeerConn) -> None:
        self._mover.peer_lost(conn)

    def _peer_region_gone(self, conn: PeerConn, region_id: int) -> None:
        self._mover.peer_region_gone(conn, region_id)

    def _make_region(self, region_id: int, buf) -> LocalRegion:
        view = byte_view(buf)
        return LocalRegion(region_id, view, view.nbytes, keep=[buf])

    def _drop_region(self, region: LocalRegion) -> None:
        pass

    def _agent_meta(self) -> bytes:
        return b""

    @staticmethod
    def _reachable(region: RegionInfo) -> bool:
        """Whether descriptors may name this peer region as their remote side (shm: shared memory only)."""
        return True

    def _validate(self, peer: Peer, op: str, descs: list[Desc]) -> None:
        """Transport-specific descriptor checks (raise ValueError) before a handle exists; called only when
        a descriptor fails the fast check (`_reachable` must refuse what this raises for)."""
