"""The `tcp` transport's data path: `TcpMover`, its data mover (mover.py): ZeroMQ for the handshake, plain
TCP sockets for the bulk bytes.

Owns: the ZeroMQ data socket (a ROUTER bound next to the control socket, served by one thread:
`DataServer`, tcp_server.py) where each data connection's handshake runs (with keys: the shared-secret proof
of kvrelay/security/dataplane.py, over CURVE when encrypting) and where the server tells the client its
plain data port; the plain data sockets' serving side (`SocketServer`, tcp_serve.py); and this endpoint's
transfers: each goes on one of a peer's data sockets (`DataConn`, tcp_conn.py: an idle one, a new one up to
``direct_sockets`` per peer, else the least busy, where it is pipelined behind the others), and the thread
that waits on its handle receives its reply straight into the registered region.
Must not touch: the control plane (control_plane.py), the handle table (handles.py), chunk contents.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
import weakref
from typing import TYPE_CHECKING

import zmq

from kvrelay.security.dataplane import PLANE, ClientSession, ServerSessions
from kvrelay.transfer.base import HandshakeError
from kvrelay.transfer.buffers import LocalRegion
from kvrelay.transfer.control import PeerConn
from kvrelay.transfer.handle import Handle
from kvrelay.transfer.mover import DataMover, Transfer
from kvrelay.transfer.tcp_conn import SLICE_S, DataConn, SockXfer, local_views, set_slices
from kvrelay.transfer.tcp_serve import SocketServer
from kvrelay.transfer.tcp_server import DataRep, DataReq, DataServer, _data_socket, _enc, _rep_dec
from kvrelay.transfer.tcp_wire import BIND, BIND_MAGIC, MAX_ERROR, REP, recv_exact, seal_plan, tune

if TYPE_CHECKING:
    from kvrelay.security.keyfiles import Keys

HANDSHAKE_S = 10.0  # the longest wait for each answer of a data connection's handshake


def _gone(conn: PeerConn) -> str:
    return conn.reason or f"peer {conn.peer.name!r} (pid {conn.peer.info.pid}) exited"


class TcpMover(DataServer, DataMover):
    """The tcp data path: serving peers (`DataServer` on ZeroMQ, `SocketServer` on plain sockets) and this
    endpoint's reads and writes on `DataConn` sockets."""

    def __init__(self, agent_name: str, ctx: zmq.Context, keys: Keys | None, data_security: str, host: str,
                 regions: dict[int, LocalRegion], frame_bytes: int, small_bytes: int, direct_sockets: int,
                 buffer_bytes: int = 0) -> None:
        self.agent_name = agent_name
        self._ctx = ctx
        self.keys = keys
        self.data_security = data_security
        self.host = host
        self._regions = regions  # the endpoint's local regions (read only)
        self.direct_sockets = max(1, direct_sockets)
        self.frame_bytes = frame_bytes
        self.small_bytes = small_bytes
        self.buffer_bytes = buffer_bytes
        self._encrypt = data_security == "curve"
        self._sessions = ServerSessions(keys) if data_security and keys else None
        self._client_sessions: weakref.WeakKeyDictionary[zmq.Socket, ClientSession] = weakref.WeakKeyDictionary()
        self._xids = itertools.count(1)
        self._opened = threading.Condition()  # a data socket finished opening (or failed to)
        self._stopping = False
        self._sockets = SocketServer(agent_name, host, regions, self._check_ranges, self._sessions, self._encrypt,
                                     buffer_bytes)
        self._sock_port = self._sockets.port
        self._data = _data_socket(ctx, zmq.ROUTER)
        try:
            if data_security == "curve" and keys is not None:
                keys.server_socket(self._data, PLANE)
            self._data_port = self._data.bind_to_random_port(f"tcp://{host}")
        except BaseException:
            self._data.close(0)
            self._sockets.close()
            raise
        self._server = threading.Thread(target=self._serve_data, name=f"kvrelay-tcp-{agent_name}-serve", daemon=True)
        self._server.start()

    def meta(self) -> bytes:
        """The ZeroMQ data socket's address and security mode, for the handshake (the client follows the
        server's mode; the plain data port is given in the data handshake)."""
        mode = f"#{self.data_security}" if self.data_security else ""
        return f"tcp://{self.host}:{self._data_port}{mode}".encode()

    # -- opening a data socket -------------------------------------------------------------------
    def _open_conn(self, conn: PeerConn) -> DataConn:
        """A plain data socket to ``conn``, bound to a session agreed on the peer's ZeroMQ data socket."""
        address, _, mode = conn.peer.info.meta.decode().partition("#")
        if mode and self.keys is None:
            raise HandshakeError(f"peer {conn.peer.name!r} authenticates its tcp data plane ({mode}): start this "
                                 f"process with the cluster's --keys DIR")
        zsock = _data_socket(self._ctx, zmq.DEALER)
        sock: socket.socket | None = None
        try:
            if mode == "curve" and self.keys is not None:
                self.keys.client_socket(zsock)
            zsock.connect(address)
            session = self._handshake(zsock, conn) if mode and self.keys is not None else None
            port = self._ask(zsock, conn, DataReq("hello", 0, [])).port if session is None else session.port
            host = address.rpartition(":")[0].removeprefix("tcp://").strip("[]")
            sock = socket.create_connection((host, port), timeout=HANDSHAKE_S)
            tune(sock, self.buffer_bytes)
            sid = session.server_nonce if session is not None else b""
            tag = session.bind_tag(sid) if session is not None else b""
            sock.sendall(BIND.pack(BIND_MAGIC, len(sid), len(tag)) + sid + tag)
            rep = bytearray(REP.size)
            if not recv_exact(sock, memoryview(rep)):
                raise HandshakeError(f"peer {conn.peer.name!r} closed its tcp data socket during the handshake")
            _, err_len = REP.unpack(rep)
            if err_len:
                err = bytearray(min(err_len, MAX_ERROR))
                recv_exact(sock, memoryview(err))
                raise HandshakeError(f"peer {conn.peer.name!r} refused the tcp data socket: {err.decode(errors='replace')}")
            sock.settimeout(None)
            set_slices(sock, SLICE_S)
            dc = DataConn(sock, zsock, session, conn.peer.name, mode == "curve", self._regions)
        except BaseException as exc:
            if sock is not None:
                sock.close()
            zsock.close(0)
            if isinstance(exc, OSError) and not isinstance(exc, HandshakeError):
                raise HandshakeError(f"peer {conn.peer.name!r}: cannot open a tcp data socket: {exc}") from exc
            raise
        if session is not None:
            self._client_sessions[zsock] = session
        return dc

    def _ask(self, zsock: zmq.Socket, conn: PeerConn, req: DataReq) -> DataRep:
        zsock.send(_enc.encode(req))
        deadline = time.monotonic() + HANDSHAKE_S
        while not zsock.poll(int(SLICE_S * 1000)):
            if conn.exited():
                raise HandshakeError(_gone(conn))
            if time.monotonic() < deadline:
                continue
            raise HandshakeError(f"peer {conn.peer.name!r}: no answer to the tcp data plane's handshake within "
                                 f"{HANDSHAKE_S:g}s (does it run with the same --keys?)")
        rep = _rep_dec.decode(zsock.recv())
        if rep.error:
            raise HandshakeError(f"peer {conn.peer.name!r} refused the tcp data plane's handshake: {rep.error}")
        return rep

    def _handshake(self, zsock: zmq.Socket, conn: PeerConn) -> ClientSession:
        assert self.keys is not None
        session = ClientSession(self.keys)
        challenge = self._ask(zsock, conn, DataReq("hello", 0, [], nonce=session.nonce))
        # the proof answers the challenge; sent even if the server failed its own
        proof, error = session.answer(challenge.nonce, challenge.proof)
        done = self._ask(zsock, conn, DataReq("proof", 0, [], nonce=proof))
        if error:
            raise HandshakeError(f"peer {conn.peer.name!r}: {error}")
        session.port = done.port
        return session

    # -- client side -----------------------------------------------------------------------------
    def _pick(self, conn: PeerConn) -> DataConn | None:
        """An idle data socket of the peer, a new one while under ``direct_sockets``, else the least busy."""
        while True:
            if conn.exited():
                return None
            with conn.lock:
                if not conn.alive or self._stopping:
                    return None
                pool: list[DataConn] = conn.extra.setdefault("tcp", [])
                pool[:] = [dc for dc in pool if not dc.broken]
                best = min(pool, key=lambda dc: dc.busy, default=None)
                opening = conn.extra.get("tcp_opening", 0)
                if best is not None and (best.busy == 0 or len(pool) + opening >= self.direct_sockets):
                    return best
                if best is None and opening >= self.direct_sockets:
                    waiting = True
                else:
                    conn.extra["tcp_opening"] = opening + 1
                    waiting = False
            if waiting:  # every socket this peer may have is being opened by other threads
                with self._opened:
                    self._opened.wait(SLICE_S)
                continue
            try:
                dc = self._open_conn(conn)
            finally:
                with conn.lock:
                    conn.extra["tcp_opening"] -= 1
                with self._opened:
                    self._opened.notify_all()
            with conn.lock:
                if conn.alive and not self._stopping:
                    conn.extra.setdefault("tcp", []).append(dc)
                    return dc
            dc.fail_all(_gone(conn))
            return None

    def start(self, xfer: Transfer) -> Handle:
        conn, op, descs = xfer.conn, xfer.op, xfer.descs
        xid = next(self._xids)  # atomic under the GIL
        try:
            dc = self._pick(conn)
        except (HandshakeError, zmq.ZMQError, OSError) as exc:
            handle = xfer.open()
            handle.fail(str(exc))
            return handle
        if dc is None:
            handle = xfer.open()
            handle.fail(_gone(conn))
            return handle
        ranges = [(d.remote_region, d.remote_offset, d.length) for d in descs]
        x = SockXfer(dc, conn, op, xid, local_views(self._regions, descs),
                     seal_plan(ranges, xid) if dc.sealer is not None else None)
        handle = x.handle = xfer.open(progress=x.progress, abort=x.abort)
        handle.set_transferring()
        dc.submit(x, DataReq(op, xid, ranges))
        return handle

    def peer_lost(self, conn: PeerConn) -> None:
        with conn.lock:
            pool = conn.extra.pop("tcp", [])
        for dc in pool:
            dc.fail_all(_gone(conn))

    def close(self) -> None:
        self._stopping = True
        self._server.join(timeout=5)
        self._data.close(0)
        self._sockets.close()
