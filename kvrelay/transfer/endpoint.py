"""What every transport endpoint shares: the control plane, peers, regions, handles and notifications.

Owns: the ZMQ control socket (ROUTER bound to host:port, served by one background thread), the
handshake (Hello -> Welcome | Refuse, compat checked on both sides), peer records keyed by name with
epoch replacement, peer liveness (a pidfd for same-host peers, a ZMQ disconnect monitor otherwise),
local region bookkeeping, the handle registry (deadline sweeps, leak counts) and notifications.
Must not touch: how bytes move (subclasses implement `_start`), chunk contents.

Subclass hooks: `_make_region`, `_drop_region`, `_agent_meta`, `_start(conn, op, descs, handle)`,
`_peer_added(conn)`, `_peer_lost(conn)`, `_peer_region_gone(conn, region_id)` (with ``announce_unmap``),
`_shutdown()`.

Thread safety: as documented on `Transport`; the hooks run on the caller's thread or on the control
thread (`_peer_added` for inbound handshakes, `_peer_lost`), never concurrently for the same peer.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Sequence

import msgspec
import numpy as np
import zmq

from kvrelay import security
from kvrelay.security.curve import release as release_zap
from kvrelay.transfer.base import (DEFAULT_TIMEOUT_S, AgentInfo, Desc, HandshakeError, Notification, Peer,
                                   RegionInfo, Transport, XferHandle, XferState, check_compat, check_descs)
from kvrelay.transfer.buffers import LocalRegion, byte_view
from kvrelay.transfer.control import Bye, Hello, Notify, PeerConn, Refuse, Unmap, Welcome
from kvrelay.transfer.control import decoder as _dec
from kvrelay.transfer.control import encoder as _enc
from kvrelay.transfer.handle import Handle

if TYPE_CHECKING:
    import torch

MAX_NOTIFICATION_BYTES = 1 << 20
_AUTH_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
HOSTNAME = socket.gethostname()


class Endpoint(Transport):
    def __init__(self, agent_name: str, compat_hash: str, host: str = "127.0.0.1", port: int = 0) -> None:
        if not agent_name:
            raise ValueError("agent_name must be a non-empty string")
        if not (0 <= int(port) < 65536):
            raise ValueError(f"port must be in [0, 65535], got {port}")
        super().__init__(agent_name, compat_hash, host, port)
        self._lock = threading.RLock()
        self._regions: dict[int, LocalRegion] = {}
        self._next_region = 1
        self._peers: dict[str, PeerConn] = {}
        self._all_conns: list[PeerConn] = []  # every conn ever made (their pidfds close at close())
        self._handles: set[Handle] = set()
        self._notifs: deque[Notification] = deque()
        self._notif_cond = threading.Condition()
        self._closed = False
        self._ctx = zmq.Context()
        self._ctrl = self._ctx.socket(zmq.ROUTER)
        self._ctrl.setsockopt(zmq.LINGER, 0)
        # with keys on, the handshake (and so every peer's agent metadata, NIXL's included) and notifications
        # travel over CURVE, and only holders of the cluster's client key are answered (kvrelay.security)
        self.keys = security.current()
        if self.keys is not None:
            self.keys.server_socket(self._ctrl, "transfer")
        if port:
            self._ctrl.bind(f"tcp://{host}:{port}")
        else:
            self.port = self._ctrl.bind_to_random_port(f"tcp://{host}")
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._watch_q: queue.SimpleQueue = queue.SimpleQueue()  # (PeerConn, monitor socket | None)
        self._thread = threading.Thread(target=self._serve, name=f"kvrelay-{self.name}-ctrl", daemon=True)
        self._thread.start()

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
    def register(self, buf) -> RegionInfo:
        self._check_open()
        with self._lock:
            rid = self._next_region
            self._next_region += 1
        region = self._make_region(rid, buf)
        with self._lock:
            self._regions[rid] = region
        return RegionInfo(rid, region.nbytes, region.device, region.meta)

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
            self._announce_unmap(region_id)
        self._drop_region(region)

    # peers are told of a deregistration (an Unmap message), so they drop the region and unmap it (nvlink)
    announce_unmap = False

    def _announce_unmap(self, region_id: int) -> None:
        msg = _enc.encode(Unmap(self.agent_name, self.epoch, region_id))
        for conn in [c for c in self._peers.values() if c.alive]:
            with conn.lock:
                try:
                    if conn.ctrl is None:
                        conn.ctrl = self._ctrl_socket(conn.peer.info.address, 0)
                    conn.ctrl.send(msg, zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # a peer that cannot be told is going away: it unmaps when it is lost

    def local_region(self, region_id: int) -> LocalRegion:
        region = self._regions.get(region_id)
        if region is None:
            raise ValueError(f"local region {region_id} is not registered on {self.agent_name!r}")
        return region

    # -- peers -----------------------------------------------------------------------------------
    def connect(self, address: str, timeout: float = DEFAULT_TIMEOUT_S) -> Peer:
        self._check_open()
        sock = self._ctrl_socket(address, 0)
        mon = sock.get_monitor_socket(_AUTH_FAILED)  # a refused CURVE handshake fails at once, not at the timeout
        try:
            sock.send(_enc.encode(Hello(self.info())))
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(mon, zmq.POLLIN)
            ready = dict(poller.poll(int(timeout * 1000)))
            auth = " or does it run with other keys (--keys)?" if self.keys is not None else " or does it need --keys?"
            if sock not in ready and mon in ready:
                raise HandshakeError(f"the peer at {address} refused the connection's handshake: authentication "
                                     f"(both sides need the same --keys DIR)")
            if sock not in ready:
                raise HandshakeError(f"no handshake answer from {address} within {timeout:.3g}s "
                                     f"(is a {self.name} endpoint listening there,{auth})")
            reply = _dec.decode(sock.recv())
        finally:
            sock.disable_monitor()
            mon.close(0)
            sock.close(0)
        if isinstance(reply, Refuse):
            raise HandshakeError(f"peer at {address} refused the handshake: {reply.reason}")
        if not isinstance(reply, Welcome):
            raise HandshakeError(f"unexpected handshake answer from {address}: {type(reply).__name__}")
        check_compat(self.info(), reply.info)
        return self._add_peer(reply.info).peer

    def _ctrl_socket(self, address: str, linger: int) -> zmq.Socket:
        """A DEALER connected to a peer's control socket (a CURVE client with keys on)."""
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, linger)
        try:
            if self.keys is not None:
                self.keys.client_socket(sock)
            sock.connect(address)
        except zmq.ZMQError:
            sock.close(0)
            raise
        return sock

    def disconnect(self, peer: Peer) -> None:
        conn = self._peers.get(peer.name)
        if conn is not None and conn.peer.info.epoch == peer.info.epoch:
            self._lose(conn, f"peer {peer.name!r} was disconnected locally", drop=True)

    def peers(self) -> list[Peer]:
        return [c.peer for c in self._peers.values() if c.alive]

    def _add_peer(self, info: AgentInfo) -> PeerConn:
        with self._lock:
            old = self._peers.get(info.name)
            if old is not None and old.peer.info.epoch == info.epoch and old.alive:
                old.peer = Peer(info)  # same process: refresh its regions
                self._peer_added(old)
                return old
            conn = PeerConn(Peer(info))
            self._peers[info.name] = conn
            self._all_conns.append(conn)
        if old is not None:
            self._lose(old, f"peer {info.name!r} restarted (epoch {old.peer.info.epoch} replaced by {info.epoch})")
        if info.pid and info.hostname == HOSTNAME:
            if not conn.watch_pid(info.pid):
                self._lose(conn, f"peer {info.name!r} (pid {info.pid}) is not running")
                return conn
        self._peer_added(conn)
        self._watch_q.put(conn)
        self._wake()
        return conn

    @staticmethod
    def peer_exited(conn: PeerConn) -> bool:
        """True once the peer is known dead (its pidfd is readable, or it was marked lost)."""
        return conn.exited()

    def _conn(self, peer: Peer) -> PeerConn | str:
        """The live connection for ``peer``, or the reason there is none."""
        conn = self._peers.get(peer.name)
        if conn is None or conn.peer.info.epoch != peer.info.epoch:
            return (f"peer {peer.name!r} epoch {peer.info.epoch} is stale (it restarted or was disconnected): "
                    f"connect() again")
        if not conn.alive:
            return conn.reason
        return conn

    def _lose(self, conn: PeerConn, reason: str, drop: bool = False) -> None:
        with self._lock:
            if not conn.alive:
                return
            conn.alive = False
            conn.reason = reason
            if drop and self._peers.get(conn.peer.name) is conn:
                del self._peers[conn.peer.name]
            handles = [h for h in self._handles if h.conn is conn]
        for h in handles:
            h.fail(reason)
        with conn.lock:
            if conn.ctrl is not None:
                conn.ctrl.close(linger=100)  # let a queued Bye reach the peer
                conn.ctrl = None
        self._peer_lost(conn)
        self._wake()  # the control thread closes the ctrl socket and pidfd

    # -- transfers -------------------------------------------------------------------------------
    def read(self, peer: Peer, descs: Sequence[Desc], timeout: float = DEFAULT_TIMEOUT_S) -> XferHandle:
        return self._transfer("read", peer, descs, timeout)

    def write(self, peer: Peer, descs: Sequence[Desc], timeout: float = DEFAULT_TIMEOUT_S) -> XferHandle:
        return self._transfer("write", peer, descs, timeout)

    def _transfer(self, op: str, peer: Peer, descs: Sequence[Desc], timeout: float) -> Handle:
        # The hot path of every transfer: a few microseconds per descriptor matter at 4 KiB (see shm.py).
        if self._closed:
            self._check_open()
        if type(descs) is not list:
            descs = list(descs)
        known = self._peers.get(peer.name)
        if known is None or known.peer.info.epoch != peer.info.epoch or not known.alive:
            conn: PeerConn | str = self._conn(peer)
        else:
            conn = known
        nbytes = self._checked_bytes(conn, op, descs) if isinstance(conn, PeerConn) else -1
        if nbytes < 0:  # a stale peer, or a descriptor the fast check did not accept: the full checks raise
            info_peer = conn.peer if isinstance(conn, PeerConn) else peer
            check_descs(descs, {rid: r.nbytes for rid, r in list(self._regions.items())}, info_peer)
            self._validate(info_peer, op, descs)
            nbytes = sum(d.length for d in descs)
        handle = Handle(peer=peer.name, op=op, nbytes=nbytes, timeout=timeout, on_release=self._released,
                        conn=conn if isinstance(conn, PeerConn) else None)
        with self._lock:
            self._handles.add(handle)
        if not isinstance(conn, PeerConn):
            handle.fail(conn)
        elif not descs or nbytes == 0:
            handle.finish(XferState.DONE)
        else:
            self._start(conn, op, descs, handle)
        return handle

    def _checked_bytes(self, conn: PeerConn, op: str, descs: list[Desc]) -> int:
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

    @staticmethod
    def _reachable(region: RegionInfo) -> bool:
        """Whether descriptors may name this peer region as their remote side (shm: shared memory only)."""
        return True

    def _released(self, handle: Handle) -> None:
        with self._lock:
            self._handles.discard(handle)

    def open_handles(self) -> int:
        """Handles not yet released (a leak counter for tests and metrics)."""
        return len(self._handles)

    # -- notifications ---------------------------------------------------------------------------
    def notify(self, peer: Peer, payload: bytes) -> None:
        if len(payload) > MAX_NOTIFICATION_BYTES:
            raise ValueError(f"notification of {len(payload)} bytes exceeds the {MAX_NOTIFICATION_BYTES}-byte "
                             f"limit: move data with read()/write() and notify with a small message")
        conn = self._conn(peer)
        if not isinstance(conn, PeerConn):
            raise HandshakeError(conn)
        with conn.lock:
            if conn.ctrl is None:
                conn.ctrl = self._ctrl_socket(conn.peer.info.address, 0)
            conn.ctrl.send(_enc.encode(Notify(self.agent_name, self.epoch, bytes(payload))))

    def get_notifications(self, timeout: float = 0.0) -> list[Notification]:
        with self._notif_cond:
            if not self._notifs and timeout > 0:
                self._notif_cond.wait_for(lambda: bool(self._notifs), timeout=timeout)
            out = list(self._notifs)
            self._notifs.clear()
        return out

    # -- the control thread ----------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            os.eventfd_write(self._wake_fd, 1)
        except OSError:
            pass

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._ctrl, zmq.POLLIN)
        poller.register(self._wake_fd, zmq.POLLIN)
        watched: dict[int, PeerConn] = {}
        while not self._closed:
            timeout_ms = self._sweep()
            for fd, conn in list(watched.items()):
                if not conn.alive:
                    poller.unregister(fd)
                    del watched[fd]
            for sock, _ in poller.poll(timeout_ms):
                if sock is self._ctrl:
                    self._serve_ctrl()
                elif sock == self._wake_fd:
                    try:
                        os.eventfd_read(self._wake_fd)
                    except BlockingIOError:
                        pass
                    while True:
                        try:
                            conn = self._watch_q.get_nowait()
                        except queue.Empty:
                            break
                        if conn.pidfd is not None and conn.alive:
                            watched[conn.pidfd] = conn
                            poller.register(conn.pidfd, zmq.POLLIN)
                elif sock in watched:
                    conn = watched[sock]
                    self._lose(conn, f"peer {conn.peer.name!r} (pid {conn.peer.info.pid}) exited")

    def _sweep(self) -> int:
        """Expire overdue handles; return the poll timeout (ms) until the next deadline."""
        now = time.monotonic()
        nxt = now + 1.0
        with self._lock:
            handles = [h for h in self._handles if not h.done]
        for h in handles:
            if not h.expire_if_due(now):
                nxt = min(nxt, h.deadline)
        return max(1, int((nxt - now) * 1000) + 1)

    def _serve_ctrl(self) -> None:
        while True:
            try:
                ident, data = self._ctrl.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:
                continue  # malformed multipart
            try:
                msg = _dec.decode(data)
            except msgspec.DecodeError:
                continue
            if isinstance(msg, Hello):
                try:
                    check_compat(self.info(), msg.info)
                except HandshakeError as exc:
                    self._ctrl.send_multipart([ident, _enc.encode(Refuse(str(exc)))])
                    continue
                try:
                    self._add_peer(msg.info)
                    welcome = _enc.encode(Welcome(self.info()))
                except Exception as exc:  # noqa: BLE001 - a transport hook failed: refuse, keep serving
                    welcome = _enc.encode(Refuse(f"{self.name} endpoint {self.agent_name!r} could not add the "
                                                 f"peer: {type(exc).__name__}: {exc}"))
                self._ctrl.send_multipart([ident, welcome])
            elif isinstance(msg, Notify):
                with self._notif_cond:
                    self._notifs.append(Notification(msg.name, msg.epoch, msg.payload))
                    self._notif_cond.notify_all()
            elif isinstance(msg, Unmap):
                conn = self._peers.get(msg.name)
                if conn is not None and conn.peer.info.epoch == msg.epoch:
                    info = conn.peer.info
                    conn.peer = Peer(msgspec.structs.replace(
                        info, regions=[r for r in info.regions if r.region_id != msg.region_id]))
                    self._peer_region_gone(conn, msg.region_id)
            elif isinstance(msg, Bye):
                conn = self._peers.get(msg.name)
                if conn is not None and conn.peer.info.epoch == msg.epoch:
                    self._lose(conn, f"peer {msg.name!r} closed its endpoint", drop=True)

    # -- lifecycle -------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.name} endpoint {self.agent_name!r} is closed")

    def close(self) -> None:
        if self._closed:
            return
        with self._lock:
            conns = list(self._peers.values())
            handles = list(self._handles)
        for conn in conns:
            if conn.alive:
                try:
                    self.notify_bye(conn)
                except zmq.ZMQError:
                    pass
        for h in handles:
            h.release()
        for conn in conns:
            self._lose(conn, f"endpoint {self.agent_name!r} closed", drop=True)
        self._closed = True
        self._wake()
        self._thread.join(timeout=5)
        self._shutdown()
        for region in list(self._regions.values()):
            self._drop_region(region)
        self._regions.clear()
        for conn in self._all_conns:
            if conn.pidfd is not None:
                os.close(conn.pidfd)
                conn.pidfd = None
        self._ctrl.close(0)
        os.close(self._wake_fd)
        release_zap(self._ctx)
        self._ctx.term()

    def notify_bye(self, conn: PeerConn) -> None:
        with conn.lock:
            if conn.ctrl is None:
                conn.ctrl = self._ctrl_socket(conn.peer.info.address, 100)
            conn.ctrl.send(_enc.encode(Bye(self.agent_name, self.epoch)), zmq.NOBLOCK)

    # -- hooks -----------------------------------------------------------------------------------
    def _make_region(self, region_id: int, buf) -> LocalRegion:
        view = byte_view(buf)
        return LocalRegion(region_id, view, view.nbytes, keep=[buf])

    def _drop_region(self, region: LocalRegion) -> None:
        pass

    def _agent_meta(self) -> bytes:
        return b""

    def _validate(self, peer: Peer, op: str, descs: list[Desc]) -> None:
        """Transport-specific descriptor checks (raise ValueError) before a handle exists; called only when
        a descriptor fails the fast check (`_reachable` must refuse what this raises for)."""

    def _start(self, conn: PeerConn, op: str, descs: list[Desc], handle: Handle) -> None:
        raise NotImplementedError

    def _peer_added(self, conn: PeerConn) -> None:
        pass

    def _peer_lost(self, conn: PeerConn) -> None:
        pass

    def _peer_region_gone(self, conn: PeerConn, region_id: int) -> None:
        """The peer deregistered ``region_id`` (announced with Unmap); its record no longer lists it."""

    def _shutdown(self) -> None:
        pass
