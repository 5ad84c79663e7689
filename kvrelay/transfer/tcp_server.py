"""The ZeroMQ half of the `tcp` transport's data plane: the data-connection handshake, and the framing of
requests on the ZeroMQ data socket.

Owns: the data-plane messages (`DataReq`, `DataRep`), `send_frames`/`recv_frames` (zero-copy sends of
registered memory; ``recv_into`` straight into place, coalesced frames through a preallocated staging
buffer) and `DataServer`, the mixin whose thread serves the data ROUTER: each data connection's handshake
(with keys: the shared-secret proof and request MACs of kvrelay/security/dataplane.py, over CURVE when
encrypting), whose answer names the plain TCP data port (tcp_serve.py) the bulk bytes then move on, and
reads and writes asked on the ZeroMQ socket itself.  Must not touch: the client side (tcp_mover.py,
tcp_conn.py), the control plane (control_plane.py).
"""

from __future__ import annotations

from typing import Iterator

import msgspec
import zmq

from kvrelay.security.dataplane import TAG_BYTES, TAGGED, ServerSessions
from kvrelay.transfer.buffers import LocalRegion
from kvrelay.transfer.frames import Piece, frame_bytes_of, plan_frames
from kvrelay.transfer.handle import Handle

ZERO_COPY_MIN = 64 << 10  # below this pyzmq's copying send is cheaper than its zero-copy bookkeeping


class DataReq(msgspec.Struct, array_like=True):
    op: str                                # "read" | "write"; with keys also "hello" | "proof" (handshake)
    xid: int
    ranges: list[tuple[int, int, int]]     # (region, offset, length) on the serving side
    seq: int = 0                           # with keys: this connection's request number (replays are refused)
    nonce: bytes = b""                     # hello: the client nonce; proof: the client's proof


class DataRep(msgspec.Struct, array_like=True):
    xid: int
    error: str = ""
    nonce: bytes = b""                     # answer to a hello: the server nonce and the server's proof
    proof: bytes = b""
    port: int = 0                          # answer to a proof (to a hello without keys): the data socket's port


_enc = msgspec.msgpack.Encoder()
_req_dec = msgspec.msgpack.Decoder(DataReq)
_rep_dec = msgspec.msgpack.Decoder(DataRep)


def _data_socket(ctx: zmq.Context, kind: int) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)  # a ROUTER drops over its HWM: never let it
    sock.setsockopt(zmq.RCVHWM, 0)
    return sock


class DataServer:
    """Mixin for TcpMover (tcp.py), which provides the attributes declared here."""

    _regions: dict[int, LocalRegion]
    _data: zmq.Socket
    frame_bytes: int
    small_bytes: int
    agent_name: str
    _stopping: bool
    _sessions: ServerSessions | None  # with keys: the handshake and request MACs
    _sock_port: int  # the plain TCP data socket's port (tcp_serve.py), given to a client that completed the handshake

    def _send_frames(self, sock: zmq.Socket, plan: list[list[Piece]], slices) -> None:
        last = len(plan) - 1
        for i, frame in enumerate(plan):
            flags = zmq.SNDMORE if i < last else 0
            if len(frame) == 1:
                (view,) = slices(frame)
                sock.send(view, flags, copy=view.nbytes < ZERO_COPY_MIN)
            else:
                sock.send(b"".join(slices(frame)), flags)

    def _recv_frames(self, sock: zmq.Socket, plan: list[list[Piece]], slices, scratch: bytearray,
                     handle: Handle | None) -> str:
        """Receive the plan's frames into place; return an error message or ''."""
        error = ""
        for frame in plan:
            if not sock.getsockopt(zmq.RCVMORE):
                return error or "the peer sent fewer frames than the descriptors need"
            want = frame_bytes_of(frame)
            if error or (handle is not None and handle.done):
                sock.recv_into(scratch)
                continue
            if len(frame) == 1:
                (view,) = slices(frame)
                got = sock.recv_into(view)
            else:
                got = sock.recv_into(scratch)
                if got == want:
                    pos = 0
                    for view in slices(frame):
                        view[:] = scratch[pos:pos + view.nbytes]
                        pos += view.nbytes
            if got != want:
                error = f"frame of {got} bytes where {want} were expected"
        while sock.getsockopt(zmq.RCVMORE):
            sock.recv_into(scratch)
            error = error or "the peer sent more frames than the descriptors need"
        return error

    # -- serving side ----------------------------------------------------------------------------
    def _remote_slices(self, ranges: list[tuple[int, int, int]], frame: list[Piece]) -> Iterator[memoryview]:
        for p in frame:
            rid, off, _ = ranges[p.desc]
            start = off + p.offset
            yield self._regions[rid].view[start:start + p.length]

    def _check_ranges(self, ranges: list[tuple[int, int, int]]) -> str:
        for rid, off, n in ranges:
            region = self._regions.get(rid)
            if region is None:
                return f"region {rid} is not registered on {self.agent_name!r}"
            if off < 0 or n < 0 or off + n > region.view.nbytes:
                return f"range [{off}, {off + n}) is outside region {rid} of {region.view.nbytes} bytes"
        return ""

    def _authenticate(self, sock: zmq.Socket, ident: bytes, head: bytes, tag: bytes | None,
                      req: DataReq) -> str | None:
        """With keys: answer a handshake message (None), or check a request's MAC ('' or the refusal)."""
        sessions = self._sessions
        assert sessions is not None
        if req.op == "hello":
            nonce, proof = sessions.challenge(ident, req.nonce)
            sock.send_multipart([ident, _enc.encode(DataRep(0, nonce=nonce, proof=proof))])
            return None
        if req.op == "proof":
            error = sessions.prove(ident, req.nonce)
            sock.send_multipart([ident, _enc.encode(DataRep(0, error, port=0 if error else self._sock_port))])
            return None
        return sessions.check(ident, head, tag, req.seq)

    def _serve_data(self) -> None:
        sock = self._data
        sock.setsockopt(zmq.RCVTIMEO, 100)  # blocking receives (cheapest wake-up); check for close() this often
        scratch = bytearray(max(self.frame_bytes, self.small_bytes))
        while not self._stopping:
            try:
                ident = sock.recv()
            except zmq.Again:
                continue
            head, tag = sock.recv(), None
            if head[:1] == TAGGED:  # with keys: TAGGED + MAC + head, in one frame
                tag, head = head[1:1 + TAG_BYTES], head[1 + TAG_BYTES:]
            try:
                req = _req_dec.decode(head)
            except msgspec.DecodeError:
                while sock.getsockopt(zmq.RCVMORE):
                    sock.recv_into(scratch)
                continue
            if self._sessions is None and req.op == "hello":  # without keys: where the data socket listens
                sock.send_multipart([ident, _enc.encode(DataRep(0, port=self._sock_port))])
                continue
            if self._sessions is not None:
                refusal = self._authenticate(sock, ident, head, tag, req)
                if refusal is None:  # a handshake message, answered
                    continue
                if refusal:
                    while sock.getsockopt(zmq.RCVMORE):
                        sock.recv_into(scratch)
                    sock.send_multipart([ident, _enc.encode(DataRep(req.xid, refusal))])
                    continue
            error = self._check_ranges(req.ranges) if req.op in ("read", "write") else f"unknown op {req.op!r}"
            if not error and req.op == "read" and len(req.ranges) == 1 and 0 < req.ranges[0][2] <= self.frame_bytes:
                rid, off, n = req.ranges[0]  # one range, one frame: the common case, without a plan
                view = self._regions[rid].view[off:off + n]
                sock.send(ident, zmq.SNDMORE)
                sock.send(_enc.encode(DataRep(req.xid)), zmq.SNDMORE)
                sock.send(view, 0, copy=n < ZERO_COPY_MIN)
                continue
            plan = plan_frames([n for _, _, n in req.ranges], self.frame_bytes, self.small_bytes)
            slices = lambda f, r=req.ranges: self._remote_slices(r, f)  # noqa: E731
            if req.op == "read":
                if error or not plan:
                    sock.send_multipart([ident, _enc.encode(DataRep(req.xid, error))])
                else:
                    sock.send(ident, zmq.SNDMORE)
                    sock.send(_enc.encode(DataRep(req.xid)), zmq.SNDMORE)
                    self._send_frames(sock, plan, slices)
            else:
                if error:
                    while sock.getsockopt(zmq.RCVMORE):
                        sock.recv_into(scratch)
                else:
                    error = self._recv_frames(sock, plan, slices, scratch, None)
                sock.send_multipart([ident, _enc.encode(DataRep(req.xid, error))])
