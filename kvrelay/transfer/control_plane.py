"""An endpoint's control plane: the control socket, the handshake, peers and their liveness, notifications.

Owns: the ZMQ context and control socket (ROUTER bound to host:port, served by one background thread),
the handshake (Hello -> Welcome | Refuse, compat checked on both sides), peer records keyed by name with
epoch replacement, peer liveness (a pidfd for same-host peers; a peer's Bye), Unmap announcements,
notifications, and the control thread (which also runs the handle table's deadline sweep).
Must not touch: regions, descriptors, how bytes move (endpoint.py and the data mover, mover.py), the
handles' bookkeeping (handles.py: the plane only asks it to fail a lost peer's handles and to sweep).

Peer events go to the `PeerEvents` given to `start` (the endpoint's hooks, which hand them to its data
mover: `DataMover.peer_added`, ``peer_lost``, ``peer_region_gone``), on the caller's thread or on the
control thread, never concurrently for the same peer.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from typing import Callable, NamedTuple

import msgspec
import zmq

from kvrelay import security
from kvrelay.security.curve import release as release_zap
from kvrelay.transfer.base import AgentInfo, HandshakeError, Notification, Peer, check_compat
from kvrelay.transfer.control import Bye, Hello, Notify, PeerConn, Refuse, Unmap, Welcome
from kvrelay.transfer.control import decoder as _dec
from kvrelay.transfer.control import encoder as _enc
from kvrelay.transfer.handles import HandleTable

MAX_NOTIFICATION_BYTES = 1 << 20
_AUTH_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


class PeerEvents(NamedTuple):
    """What the plane tells its endpoint about peers (see `DataMover` for each event's contract)."""

    added: Callable[[PeerConn], None]             # a handshake completed (or a known peer refreshed); raise to refuse
    lost: Callable[[PeerConn], None]              # the peer is gone for good (its handles have been failed)
    region_gone: Callable[[PeerConn, int], None]  # the peer deregistered a region (announced with Unmap)


class ControlPlane:
    def __init__(self, transport: str, agent_name: str, host: str, port: int, info: Callable[[], AgentInfo],
                 table: HandleTable, hostname: str) -> None:
        self.transport = transport  # the transport's name, for messages
        self.agent_name = agent_name
        self.hostname = hostname
        self._info = info
        self._table = table
        self._events: PeerEvents | None = None  # set by start()
        self.lock = threading.RLock()
        self.peers: dict[str, PeerConn] = {}
        self._all_conns: list[PeerConn] = []  # every conn ever made (their pidfds close at close())
        self._notifs: deque[Notification] = deque()
        self._notif_cond = threading.Condition()
        self.closed = False
        self.ctx = zmq.Context()
        self._ctrl = self.ctx.socket(zmq.ROUTER)
        self._ctrl.setsockopt(zmq.LINGER, 0)
        # with keys on, the handshake (and so every peer's agent metadata, NIXL's included) and notifications
        # travel over CURVE, and only holders of the cluster's client key are answered (kvrelay.security)
        self.keys = security.current()
        if self.keys is not None:
            self.keys.server_socket(self._ctrl, "transfer")
        if port:
            self._ctrl.bind(f"tcp://{host}:{port}")
            self.port = port
        else:
            self.port = self._ctrl.bind_to_random_port(f"tcp://{host}")
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._watch_q: queue.SimpleQueue = queue.SimpleQueue()  # PeerConns whose pidfd the thread watches
        self._thread = threading.Thread(target=self._serve, name=f"kvrelay-{transport}-ctrl", daemon=True)

    def start(self, events: PeerEvents) -> None:
        """Deliver peer events to ``events`` and start serving the control socket."""
        self._events = events
        self._thread.start()

    @property
    def events(self) -> PeerEvents:
        if self._events is None:
            raise RuntimeError("the control plane is not started")
        return self._events

    # -- peers -----------------------------------------------------------------------------------
    def connect(self, address: str, timeout: float) -> Peer:
        sock = self.ctrl_socket(address, 0)
        mon = sock.get_monitor_socket(_AUTH_FAILED)  # a refused CURVE handshake fails at once, not at the timeout
        try:
            sock.send(_enc.encode(Hello(self._info())))
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
                                     f"(is a {self.transport} endpoint listening there,{auth})")
            reply = _dec.decode(sock.recv())
        finally:
            sock.disable_monitor()
            mon.close(0)
            sock.close(0)
        if isinstance(reply, Refuse):
            raise HandshakeError(f"peer at {address} refused the handshake: {reply.reason}")
        if not isinstance(reply, Welcome):
            raise HandshakeError(f"unexpected handshake answer from {address}: {type(reply).__name__}")
        check_compat(self._info(), reply.info)
        return self._add_peer(reply.info).peer

    def ctrl_socket(self, address: str, linger: int) -> zmq.Socket:
        """A DEALER connected to a peer's control socket (a CURVE client with keys on)."""
        sock = self.ctx.socket(zmq.DEALER)
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
        conn = self.peers.get(peer.name)
        if conn is not None and conn.peer.info.epoch == peer.info.epoch:
            self.lose(conn, f"peer {peer.name!r} was disconnected locally", drop=True)

    def live_peers(self) -> list[Peer]:
        return [c.peer for c in self.peers.values() if c.alive]

    def _add_peer(self, info: AgentInfo) -> PeerConn:
        with self.lock:
            old = self.peers.get(info.name)
            if old is not None and old.peer.info.epoch == info.epoch and old.alive:
                old.peer = Peer(info)  # same process: refresh its regions
                self.events.added(old)
                return old
            conn = PeerConn(Peer(info))
            self.peers[info.name] = conn
            self._all_conns.append(conn)
        if old is not None:
            self.lose(old, f"peer {info.name!r} restarted (epoch {old.peer.info.epoch} replaced by {info.epoch})")
        if info.pid and info.hostname == self.hostname:
            if not conn.watch_pid(info.pid):
                self.lose(conn, f"peer {info.name!r} (pid {info.pid}) is not running")
                return conn
        self.events.added(conn)
        self._watch_q.put(conn)
        self._wake()
        return conn

    def conn(self, peer: Peer) -> PeerConn | str:
        """The live connection for ``peer``, or the reason there is none."""
        conn = self.peers.get(peer.name)
        if conn is None or conn.peer.info.epoch != peer.info.epoch:
            return (f"peer {peer.name!r} epoch {peer.info.epoch} is stale (it restarted or was disconnected): "
                    f"connect() again")
        if not conn.alive:
            return conn.reason
        return conn

    def lose(self, conn: PeerConn, reason: str, drop: bool = False) -> None:
        """Mark ``conn`` lost (once): fail its handles, close its control socket, send the ``lost`` event."""
        with self.lock:
            if not conn.alive:
                return
            conn.alive = False
            conn.reason = reason
            if drop and self.peers.get(conn.peer.name) is conn:
                del self.peers[conn.peer.name]
        self._table.fail_on(conn, reason)
        with conn.lock:
            if conn.ctrl is not None:
                conn.ctrl.close(linger=100)  # let a queued Bye reach the peer
                conn.ctrl = None
        self.events.lost(conn)
        self._wake()  # the control thread stops watching its pidfd

    # -- messages to peers -----------------------------------------------------------------------
    def announce_unmap(self, epoch: str, region_id: int) -> None:
        """Tell every live peer that ``region_id`` is deregistered (they drop it, and unmap it: nvlink)."""
        msg = _enc.encode(Unmap(self.agent_name, epoch, region_id))
        for conn in [c for c in self.peers.values() if c.alive]:
            with conn.lock:
                try:
                    if conn.ctrl is None:
                        conn.ctrl = self.ctrl_socket(conn.peer.info.address, 0)
                    conn.ctrl.send(msg, zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # a peer that cannot be told is going away: it unmaps when it is lost

    def notify(self, peer: Peer, epoch: str, payload: bytes) -> None:
        if len(payload) > MAX_NOTIFICATION_BYTES:
            raise ValueError(f"notification of {len(payload)} bytes exceeds the {MAX_NOTIFICATION_BYTES}-byte "
                             f"limit: move data with read()/write() and notify with a small message")
        conn = self.conn(peer)
        if not isinstance(conn, PeerConn):
            raise HandshakeError(conn)
        with conn.lock:
            if conn.ctrl is None:
                conn.ctrl = self.ctrl_socket(conn.peer.info.address, 0)
            conn.ctrl.send(_enc.encode(Notify(self.agent_name, epoch, bytes(payload))))

    def get_notifications(self, timeout: float) -> list[Notification]:
        with self._notif_cond:
            if not self._notifs and timeout > 0:
                self._notif_cond.wait_for(lambda: bool(self._notifs), timeout=timeout)
            out = list(self._notifs)
            self._notifs.clear()
        return out

    def notify_bye(self, conn: PeerConn, epoch: str) -> None:
        with conn.lock:
            if conn.ctrl is None:
                conn.ctrl = self.ctrl_socket(conn.peer.info.address, 100)
            conn.ctrl.send(_enc.encode(Bye(self.agent_name, epoch)), zmq.NOBLOCK)

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
        while not self.closed:
            timeout_ms = self._table.sweep()
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
                    self.lose(conn, f"peer {conn.peer.name!r} (pid {conn.peer.info.pid}) exited")

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
                    check_compat(self._info(), msg.info)
                except HandshakeError as exc:
                    self._ctrl.send_multipart([ident, _enc.encode(Refuse(str(exc)))])
                    continue
                try:
                    self._add_peer(msg.info)
                    welcome = _enc.encode(Welcome(self._info()))
                except Exception as exc:  # noqa: BLE001 - a transport hook failed: refuse, keep serving
                    welcome = _enc.encode(Refuse(f"{self.transport} endpoint {self.agent_name!r} could not add "
                                                 f"the peer: {type(exc).__name__}: {exc}"))
                self._ctrl.send_multipart([ident, welcome])
            elif isinstance(msg, Notify):
                with self._notif_cond:
                    self._notifs.append(Notification(msg.name, msg.epoch, msg.payload))
                    self._notif_cond.notify_all()
            elif isinstance(msg, Unmap):
                conn = self.peers.get(msg.name)
                if conn is not None and conn.peer.info.epoch == msg.epoch:
                    info = conn.peer.info
                    conn.peer = Peer(msgspec.structs.replace(
                        info, regions=[r for r in info.regions if r.region_id != msg.region_id]))
                    self.events.region_gone(conn, msg.region_id)
            elif isinstance(msg, Bye):
                conn = self.peers.get(msg.name)
                if conn is not None and conn.peer.info.epoch == msg.epoch:
                    self.lose(conn, f"peer {msg.name!r} closed its endpoint", drop=True)

    # -- lifecycle -------------------------------------------------------------------------------
    def say_goodbye(self, epoch: str) -> list[PeerConn]:
        """Send Bye to every live peer; return the peers known now (for `lose_all`)."""
        with self.lock:
            conns = list(self.peers.values())
        for conn in conns:
            if conn.alive:
                try:
                    self.notify_bye(conn, epoch)
                except zmq.ZMQError:
                    pass
        return conns

    def stop(self) -> None:
        """Stop the control thread (peers are lost already)."""
        self.closed = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def close(self) -> None:
        """Close pidfds, sockets and the context (after `stop` and after the mover closed its sockets)."""
        for conn in self._all_conns:
            if conn.pidfd is not None:
                os.close(conn.pidfd)
                conn.pidfd = None
        self._ctrl.close(0)
        os.close(self._wake_fd)
        release_zap(self.ctx)
        self.ctx.term()
