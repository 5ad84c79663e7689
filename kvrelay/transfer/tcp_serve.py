"""The serving side of the tcp transport's plain data sockets: a listener next to the ZeroMQ data socket,
and one thread per accepted connection answering that connection's requests in order.

Owns: `SocketServer` (the listening socket on the endpoint's host, its accept thread, each connection's
thread: the bind check, request MACs and sequence numbers, reads sent with scatter-gather ``sendmsg``
straight from the registered region, writes received with ``recv_into`` straight into it, or with
encryption sealed/opened chunk by chunk).  Must not touch: the ZeroMQ socket and its handshake
(tcp_server.py), the client side (tcp_conn.py), the control plane.

A connection that does not bind to a session first, sends a wrong MAC, replays a sequence number, sends a
malformed head or a chunk that does not open, gets one error reply naming the problem and is closed;
nothing of its payload is written.
"""

from __future__ import annotations

import socket
import threading
from typing import Callable

import msgspec

from kvrelay.security.dataplane import PLANE, SEAL_BYTES, TO_CLIENT, TO_SERVER, ChunkOpener, ChunkSealer, ServerSessions
from kvrelay.security.metrics import refused
from kvrelay.transfer.buffers import LocalRegion
from kvrelay.transfer.tcp_server import DataReq
from kvrelay.transfer.tcp_wire import (BIND, BIND_MAGIC, MAX_HEAD, MAX_TAG, REP, REQ, SEAL_CHUNK, recv_exact, seal_plan,
                                       send_all, tune)

_req_dec = msgspec.msgpack.Decoder(DataReq)
DRAIN_BYTES = 1 << 20


class _Refused(Exception):
    """A request this connection must not serve: reply with the message, then close the connection."""

    def __init__(self, xid: int, message: str) -> None:
        super().__init__(message)
        self.xid = xid


class SocketServer:
    """Plain TCP data sockets of one endpoint (see the module docstring)."""

    def __init__(self, agent_name: str, host: str, regions: dict[int, LocalRegion],
                 check_ranges: Callable[[list[tuple[int, int, int]]], str], sessions: ServerSessions | None,
                 encrypt: bool, buffer_bytes: int = 0) -> None:
        self.agent_name = agent_name
        self._regions = regions
        self._check_ranges = check_ranges
        self._sessions = sessions
        self._encrypt = encrypt
        self._buffer_bytes = buffer_bytes
        self._listen = socket.create_server((host, 0), backlog=128)
        self.port: int = self._listen.getsockname()[1]
        self._stopping = False
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._accept = threading.Thread(target=self._accept_loop, name=f"kvrelay-tcp-{agent_name}-accept",
                                        daemon=True)
        self._accept.start()

    def close(self) -> None:
        self._stopping = True
        try:
            self._listen.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        self._accept.join(timeout=5)
        self._listen.close()
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)  # its thread sees EOF, closes it and exits
            except OSError:
                pass

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                sock, _ = self._listen.accept()
            except OSError:
                continue
            if self._stopping:
                sock.close()
                return
            with self._lock:
                self._conns.add(sock)
            threading.Thread(target=self._serve, args=(sock,), name=f"kvrelay-tcp-{self.agent_name}-conn",
                             daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            tune(sock, self._buffer_bytes)
            self._serve_conn(sock)
        except _Refused as exc:
            try:
                self._reply(sock, exc.xid, str(exc))
            except OSError:
                pass
        except OSError:
            pass  # the peer went away
        finally:
            with self._lock:
                self._conns.discard(sock)
            sock.close()

    @staticmethod
    def _reply(sock: socket.socket, xid: int, error: str = "") -> None:
        err = error.encode()
        sock.sendall(REP.pack(xid, len(err)) + err)

    def _bind(self, sock: socket.socket) -> list | None:
        """The session this connection binds to (None without keys); _Refused otherwise."""
        head = bytearray(BIND.size)
        if not recv_exact(sock, memoryview(head)):
            raise OSError("closed before binding")
        magic, sid_len, tag_len = BIND.unpack(head)
        if magic != BIND_MAGIC or sid_len > MAX_TAG or tag_len > MAX_TAG:
            reason = "a data connection that did not start with the handshake's bind message"
            refused(PLANE, reason)
            raise _Refused(0, f"authentication required: {reason} (connect through a kvrelay tcp transport)")
        body = bytearray(sid_len + tag_len)
        if not recv_exact(sock, memoryview(body)):
            raise OSError("closed while binding")
        if self._sessions is None:
            return None
        record, refusal = self._sessions.bind(bytes(body[:sid_len]), bytes(body[sid_len:]))
        if record is None:
            raise _Refused(0, refusal)
        return record

    def _serve_conn(self, sock: socket.socket) -> None:
        record = self._bind(sock)
        self._reply(sock, 0)
        sealer = ChunkSealer(record[0], TO_CLIENT) if self._encrypt and record else None
        opener = ChunkOpener(record[0], TO_SERVER) if self._encrypt and record else None
        sealed = bytearray(SEAL_CHUNK + SEAL_BYTES) if self._encrypt else bytearray(0)
        plain = bytearray(SEAL_CHUNK) if self._encrypt else bytearray(0)
        hdr = bytearray(REQ.size)
        hview = memoryview(hdr)
        while True:
            if not recv_exact(sock, hview):
                return
            head_len, tag_len = REQ.unpack(hdr)
            if head_len > MAX_HEAD or tag_len > MAX_TAG:
                raise _Refused(0, f"a request head of {head_len} bytes (limit {MAX_HEAD}) with a {tag_len}-byte "
                                  f"tag: not a kvrelay data request")
            body = bytearray(tag_len + head_len)
            if not recv_exact(sock, memoryview(body)):
                return
            head = bytes(body[tag_len:])
            try:
                req = _req_dec.decode(head)
            except msgspec.DecodeError:
                raise _Refused(0, "a malformed request head") from None
            if record is not None and self._sessions is not None:
                refusal = self._sessions.check_record(record, head, bytes(body[:tag_len]) if tag_len else None,
                                                      req.seq)
                if refusal:
                    raise _Refused(req.xid, refusal)
            ranges = req.ranges
            error = self._check_ranges(ranges) if req.op in ("read", "write") else f"unknown op {req.op!r}"
            if req.op == "read":
                if error:
                    self._reply(sock, req.xid, error)
                elif sealer is not None:
                    self._reply(sock, req.xid)
                    out = memoryview(sealed)
                    for i, pos, k, ad in seal_plan(ranges, req.xid):
                        rid, off, _ = ranges[i]
                        sealer.seal_into(self._regions[rid].view[off + pos:off + pos + k], ad, out[:k + SEAL_BYTES])
                        sock.sendall(out[:k + SEAL_BYTES])
                else:
                    views = [self._regions[rid].view[off:off + n] for rid, off, n in ranges]
                    send_all(sock, [memoryview(REP.pack(req.xid, 0))] + views)
            elif req.op == "write":
                if error:
                    if any(n < 0 for _, _, n in ranges):
                        raise _Refused(req.xid, error)
                    self._drain(sock, ranges, req.xid)
                    self._reply(sock, req.xid, error)
                    continue
                if opener is not None:
                    self._open_chunks(sock, ranges, req.xid, opener, memoryview(sealed), memoryview(plain))
                else:
                    for rid, off, n in ranges:
                        if n and not recv_exact(sock, self._regions[rid].view[off:off + n]):
                            return
                self._reply(sock, req.xid)
            else:
                raise _Refused(req.xid, error)

    def _drain(self, sock: socket.socket, ranges: list[tuple[int, int, int]], xid: int) -> None:
        left = sum(n for _, _, n in ranges)
        if self._encrypt:
            left += SEAL_BYTES * len(seal_plan(ranges, xid))
        scratch = memoryview(bytearray(min(left, DRAIN_BYTES)))
        while left > 0:
            k = min(left, scratch.nbytes)
            if not recv_exact(sock, scratch[:k]):
                raise OSError("closed mid-payload")
            left -= k

    def _open_chunks(self, sock: socket.socket, ranges: list[tuple[int, int, int]], xid: int, opener: ChunkOpener,
                     sealed: memoryview, plain: memoryview) -> None:
        for i, pos, k, ad in seal_plan(ranges, xid):
            if not recv_exact(sock, sealed[:k + SEAL_BYTES]):
                raise OSError("closed mid-payload")
            if not opener.open_into(sealed[:k + SEAL_BYTES], ad, plain[:k]):
                reason = "an encrypted chunk that does not authenticate (tampered, reordered or replayed)"
                refused(PLANE, reason)
                raise _Refused(xid, f"refused {reason}: nothing of it was written")
            rid, off, _ = ranges[i]
            self._regions[rid].view[off + pos:off + pos + k] = plain[:k]
