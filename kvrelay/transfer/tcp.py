"""`tcp`: transport over ZeroMQ (any host), one-sided through the peer endpoint's data thread.

Owns: the data socket (ROUTER bound next to the control socket, served by one thread that answers
read requests with zero-copy frames of the registered region and receives write frames with
``recv_into`` straight into it) and the client pump (one thread owning a DEALER per peer; it sends
requests and receives replies with ``recv_into`` into the destination region, so no buffer is
allocated per message: coalesced small ranges go through one preallocated staging buffer).
Must not touch: the control plane (endpoint.py), chunk contents.

Framing is `frames.plan_frames` on both sides.  A cancelled or expired read still drains its frames
(into the staging buffer, never into the caller's memory once the handle is terminal).
"""

from __future__ import annotations

import functools
import itertools
import os
import queue
import threading
import time
import weakref
from typing import Iterator

import zmq

from kvrelay import security
from kvrelay.security.dataplane import PLANE, TAGGED, ClientSession, ServerSessions
from kvrelay.transfer.base import Desc, HandshakeError, XferState
from kvrelay.transfer.endpoint import Endpoint, PeerConn
from kvrelay.transfer.frames import FRAME_BYTES, SMALL_BYTES, Piece, plan_frames
from kvrelay.transfer.handle import Handle
from kvrelay.transfer.tcp_server import DataRep, DataReq, DataServer, _data_socket, _enc, _rep_dec

DIRECT_SOCKETS = 16  # per peer: transfers beyond this many in flight go through the pump thread
SLICE_S = 0.02  # a waiting thread checks the deadline and the peer's liveness this often
HANDSHAKE_S = 10.0  # with keys: the longest wait for each answer of a data socket's handshake


class _Direct:
    """A direct transfer's receiving side: whichever thread waits on the handle receives the reply on the
    pooled socket (``recv_into`` the destination), then gives the socket back to the pool."""

    __slots__ = ("tp", "conn", "pair", "entry", "xid", "lock", "returned")

    def __init__(self, tp: "TcpTransport", conn: PeerConn, pair: tuple[zmq.Socket, bytearray], entry: tuple,
                 xid: int) -> None:
        self.tp = tp
        self.conn = conn
        self.pair = pair
        self.entry = entry
        self.xid = xid
        self.lock = threading.Lock()
        self.returned = False

    def give_back(self) -> None:  # with lock held; a reply still in flight is drained by the next user
        if not self.returned:
            self.returned = True
            self.tp._return_sync(self.conn, self.pair)

    def free(self) -> None:
        with self.lock:
            self.give_back()

    def progress(self, timeout: float) -> None:
        if not self.lock.acquire(timeout=max(0.0, timeout)):
            return
        try:
            self._receive(timeout)
        finally:
            self.lock.release()

    def _receive(self, timeout: float) -> None:
        sock, scratch = self.pair
        handle, conn = self.entry[3], self.conn
        until = time.monotonic() + timeout
        while not self.returned:
            if handle.done:
                self.give_back()
                return
            # A blocking recv bounded by RCVTIMEO (= SLICE_S): cheaper than zmq_poll + recv (whose poll leaves
            # the next send on this socket paying for pending commands).
            try:
                data = sock.recv() if until - time.monotonic() >= 1e-3 else sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                if self.tp.peer_exited(conn):
                    handle.fail(conn.reason or f"peer {conn.peer.name!r} (pid {conn.peer.info.pid}) exited")
                handle.expire_if_due()
                if time.monotonic() >= until:
                    return
                continue
            rep = _rep_dec.decode(data)
            if rep.xid != self.xid:  # the tail of an earlier, abandoned transfer on this socket
                while sock.getsockopt(zmq.RCVMORE):
                    sock.recv_into(scratch)
                continue
            self.tp._complete(sock, rep, self.entry, scratch)
            self.give_back()


class TcpTransport(DataServer, Endpoint):
    name = "tcp"

    def __init__(self, agent_name: str, compat_hash: str, host: str = "127.0.0.1", port: int = 0,
                 frame_bytes: int = FRAME_BYTES, small_bytes: int = SMALL_BYTES,
                 direct_sockets: int = DIRECT_SOCKETS, encrypt: bool | None = None) -> None:
        if encrypt is None:
            encrypt = os.environ.get("KVRELAY_TCP_ENCRYPT", "") not in ("", "0")
        if encrypt and security.current() is None:
            raise ValueError("an encrypted tcp data plane needs keys: `kvrelay keys DIR`, then --keys DIR")
        super().__init__(agent_name, compat_hash, host, port)
        self.direct_sockets = direct_sockets
        self.frame_bytes = frame_bytes
        self.small_bytes = small_bytes
        # with keys the data plane is authenticated (a handshake per connection, a MAC per request header:
        # kvrelay/security/dataplane.py says what that covers), or encrypted with CURVE when asked to
        self.data_security = "" if self.keys is None else "curve" if encrypt else "hmac"
        self._sessions = ServerSessions(self.keys) if self.data_security == "hmac" and self.keys else None
        self._client_sessions: weakref.WeakKeyDictionary[zmq.Socket, ClientSession] = weakref.WeakKeyDictionary()
        self._data = _data_socket(self._ctx, zmq.ROUTER)
        if self.data_security == "curve" and self.keys is not None:
            self.keys.server_socket(self._data, PLANE)
        self._data_port = self._data.bind_to_random_port(f"tcp://{host}")
        self._pump_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._xids = itertools.count(1)
        self._stopping = False
        self._server = threading.Thread(target=self._serve_data, name=f"kvrelay-tcp-{agent_name}-serve", daemon=True)
        self._pump = threading.Thread(target=self._pump_loop, name=f"kvrelay-tcp-{agent_name}-pump", daemon=True)
        self._server.start()
        self._pump.start()

    def _agent_meta(self) -> bytes:
        mode = f"#{self.data_security}" if self.data_security else ""  # the client follows the server's mode
        return f"tcp://{self.host}:{self._data_port}{mode}".encode()

    def _open_data(self, conn: PeerConn) -> zmq.Socket:
        """A DEALER to ``conn``'s data socket, authenticated (or encrypted) as the peer's meta says."""
        address, _, mode = conn.peer.info.meta.decode().partition("#")
        if mode and self.keys is None:
            raise HandshakeError(f"peer {conn.peer.name!r} authenticates its tcp data plane ({mode}): start this "
                                 f"process with the cluster's --keys DIR")
        sock = _data_socket(self._ctx, zmq.DEALER)
        try:
            if mode == "curve" and self.keys is not None:
                self.keys.client_socket(sock)
            sock.connect(address)
            if mode == "hmac" and self.keys is not None:
                self._client_sessions[sock] = self._handshake(sock, conn)
        except BaseException:
            sock.close(0)
            raise
        return sock

    def _handshake(self, sock: zmq.Socket, conn: PeerConn) -> ClientSession:
        assert self.keys is not None
        session = ClientSession(self.keys)
        replies: list[DataRep] = []
        error = ""
        for req in (DataReq("hello", 0, [], nonce=session.nonce), None):
            if req is None:  # the proof answers the challenge; sent even if the server failed its own
                proof, error = session.answer(replies[0].nonce, replies[0].proof)
                req = DataReq("proof", 0, [], nonce=proof)
            sock.send(_enc.encode(req))
            if not sock.poll(int(HANDSHAKE_S * 1000)):
                raise HandshakeError(f"peer {conn.peer.name!r}: no answer to the tcp data plane's handshake within "
                                     f"{HANDSHAKE_S:g}s (does it run with the same --keys?)")
            rep = _rep_dec.decode(sock.recv())
            if rep.error:
                raise HandshakeError(f"peer {conn.peer.name!r} refused the tcp data plane's handshake: {rep.error}")
            replies.append(rep)
        if error:
            raise HandshakeError(f"peer {conn.peer.name!r}: {error}")
        return session

    def _send_request(self, sock: zmq.Socket, req: DataReq, descs: list[Desc], plan: list[list[Piece]]) -> None:
        """The request head (with keys: its sequence number and MAC), then a write's frames."""
        session = self._client_sessions.get(sock)
        if session is not None:
            req.seq = session.next_seq()
        head = _enc.encode(req)
        more = zmq.SNDMORE if req.op == "write" else 0
        if session is not None:  # one frame: a zero byte (never the start of a msgpack array), the MAC, the head
            sock.send(TAGGED + session.tag(head) + head, more)
        else:
            sock.send(head, more)
        if more:
            self._send_frames(sock, plan, functools.partial(self._local_slices, descs))

    # -- client side -----------------------------------------------------------------------------
    def _start(self, conn: PeerConn, op: str, descs: list[Desc], handle: Handle) -> None:
        xid = next(self._xids)  # atomic under the GIL
        try:
            pair = self._sync_socket(conn)
        except (HandshakeError, zmq.ZMQError) as exc:
            handle.fail(str(exc))
            return
        if pair is None:
            self._cmds.put(("xfer", conn, op, descs, handle, xid))
            os.eventfd_write(self._pump_fd, 1)
        else:
            self._direct(conn, pair, op, descs, handle, xid)

    # Direct transfers: the caller's thread sends the request on a pooled DEALER and whichever thread
    # waits on the handle receives the reply (recv_into the destination): no hand-off to the pump,
    # so a round trip costs the same thread wake-ups as raw pyzmq.
    def _sync_socket(self, conn: PeerConn) -> tuple[zmq.Socket, bytearray] | None:
        with conn.lock:
            if not conn.alive or self._stopping:
                return None
            pool = conn.extra.setdefault("sync", [])
            if pool:
                conn.extra["sync_out"] = conn.extra.get("sync_out", 0) + 1
                return pool.pop()
            if conn.extra.get("sync_out", 0) >= self.direct_sockets:
                return None
            conn.extra["sync_out"] = conn.extra.get("sync_out", 0) + 1
        try:
            sock = self._open_data(conn)
        except BaseException:
            with conn.lock:
                conn.extra["sync_out"] -= 1
            raise
        sock.setsockopt(zmq.RCVTIMEO, int(SLICE_S * 1000))
        return sock, bytearray(max(self.frame_bytes, self.small_bytes))

    def _return_sync(self, conn: PeerConn, pair: tuple[zmq.Socket, bytearray]) -> None:
        with conn.lock:
            conn.extra["sync_out"] -= 1
            if conn.alive and not self._stopping:
                conn.extra.setdefault("sync", []).append(pair)
                return
        pair[0].close(0)

    def _direct(self, conn: PeerConn, pair: tuple[zmq.Socket, bytearray], op: str, descs: list[Desc],
                handle: Handle, xid: int) -> None:
        sock = pair[0]
        plan = plan_frames([d.length for d in descs], self.frame_bytes, self.small_bytes)
        direct = _Direct(self, conn, pair, (conn, op, descs, handle, plan), xid)
        handle._progress = direct.progress
        handle._free = direct.free
        handle.set_transferring()
        self._send_request(sock, DataReq(op, xid, [(d.remote_region, d.remote_offset, d.length) for d in descs]),
                           descs, plan)

    def _peer_lost(self, conn: PeerConn) -> None:
        with conn.lock:
            for sock, _ in conn.extra.pop("sync", []):
                sock.close(0)
        if not self._stopping:
            self._cmds.put(("drop", conn))
            os.eventfd_write(self._pump_fd, 1)

    def _local_slices(self, descs: list[Desc], frame: list[Piece]) -> Iterator[memoryview]:
        for p in frame:
            d = descs[p.desc]
            start = d.local_offset + p.offset
            yield self._regions[d.local_region].view[start:start + p.length]

    def _pump_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._pump_fd, zmq.POLLIN)
        socks: dict[zmq.Socket, PeerConn] = {}
        pending: dict[int, tuple] = {}
        scratch = bytearray(max(self.frame_bytes, self.small_bytes))
        while True:
            for sock, _ in poller.poll(1000):
                if sock == self._pump_fd:
                    try:
                        os.eventfd_read(self._pump_fd)
                    except BlockingIOError:
                        pass
                    while True:
                        try:
                            cmd = self._cmds.get_nowait()
                        except queue.Empty:
                            break
                        if cmd[0] == "stop":
                            for s in socks:
                                s.close(0)
                            return
                        if cmd[0] == "drop":
                            for s, c in list(socks.items()):
                                if c is cmd[1]:
                                    poller.unregister(s)
                                    s.close(0)
                                    del socks[s]
                            for xid in [x for x, e in pending.items() if e[0] is cmd[1]]:
                                del pending[xid]
                            continue
                        _, conn, op, descs, handle, xid = cmd
                        if handle.done:
                            continue
                        if not conn.alive:
                            handle.fail(conn.reason)
                            continue
                        sock = conn.extra.get("sock")
                        if sock is None:
                            try:
                                sock = conn.extra["sock"] = self._open_data(conn)
                            except (HandshakeError, zmq.ZMQError) as exc:
                                handle.fail(str(exc))
                                continue
                            socks[sock] = conn
                            poller.register(sock, zmq.POLLIN)
                        plan = plan_frames([d.length for d in descs], self.frame_bytes, self.small_bytes)
                        ranges = [(d.remote_region, d.remote_offset, d.length) for d in descs]
                        handle.set_transferring()
                        pending[xid] = (conn, op, descs, handle, plan)
                        self._send_request(sock, DataReq(op, xid, ranges), descs, plan)
                elif sock in socks:
                    self._receive_reply(sock, pending, scratch)

    def _receive_reply(self, sock: zmq.Socket, pending: dict, scratch: bytearray) -> None:
        while True:
            try:
                rep = _rep_dec.decode(sock.recv(zmq.NOBLOCK))
            except zmq.Again:
                return
            entry = pending.pop(rep.xid, None)
            if entry is None:  # its peer was dropped: drain
                while sock.getsockopt(zmq.RCVMORE):
                    sock.recv_into(scratch)
                continue
            self._complete(sock, rep, entry, scratch)

    def _complete(self, sock: zmq.Socket, rep: DataRep, entry: tuple, scratch: bytearray) -> None:
        conn, op, descs, handle, plan = entry
        if rep.error:
            while sock.getsockopt(zmq.RCVMORE):
                sock.recv_into(scratch)
            handle.fail(f"peer {conn.peer.name!r} refused the {op}: {rep.error}")
            return
        if op == "read":
            error = self._recv_frames(sock, plan, lambda f: self._local_slices(descs, f), scratch, handle)
            if error:
                handle.fail(f"read from peer {conn.peer.name!r}: {error}")
                return
        handle.finish(XferState.DONE)

    def _shutdown(self) -> None:
        self._stopping = True
        self._cmds.put(("stop",))
        os.eventfd_write(self._pump_fd, 1)
        self._pump.join(timeout=5)
        self._server.join(timeout=5)
        self._data.close(0)
        os.close(self._pump_fd)
