"""The client side of one plain TCP data socket of the tcp transport: requests pipelined in order, replies
received by whichever thread waits on one of them, straight into the caller's registered memory.

Owns: `DataConn` (the socket, the ZeroMQ socket its session was agreed on, its send queue and its queue of
transfers awaiting replies) and `SockXfer` (one transfer's driver: ``progress``, ``abort``).  Must not
touch: handshakes (tcp_mover.py runs them), the serving side (tcp_serve.py), the control plane.

Sending: `DataConn.submit` queues a request (its head, then a write's payload: views of the registered
region, scatter-gather ``sendmsg``; with encryption, chunks sealed one at a time into one buffer) and sends
what the socket takes without blocking; the rest is sent by the thread that waits (polling for both
directions, so a pipelined read reply never blocks a write behind it).
Receiving: the waiting thread takes the receive lock and consumes replies in order, completing earlier
transfers on the way.  Bytes land in the caller's memory only under a transfer's ``landing`` lock and only
while its handle is not terminal; `SockXfer.abort` (run by cancel, expiry and failure) takes that lock, so
once ``cancel()`` returns nothing more lands there: the rest of that reply is drained into a scratch buffer.
Encrypted chunks are opened into a scratch buffer (GCM writes before it verifies) and copied only if
they authenticate.  A broken socket (the peer died, a reply out of order, a chunk that does not open)
fails every transfer waiting on it and is closed; the next transfer opens a new one.
"""

from __future__ import annotations

import collections
import errno
import select
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING, Iterator

import msgspec
import zmq

from kvrelay.security.dataplane import SEAL_BYTES, TO_CLIENT, TO_SERVER, ChunkOpener, ChunkSealer, ClientSession
from kvrelay.transfer.base import Desc, XferState
from kvrelay.transfer.tcp_server import DataReq
from kvrelay.transfer.tcp_wire import IOV_MAX, REP, REQ, SEAL_CHUNK, advance

if TYPE_CHECKING:
    from kvrelay.transfer.buffers import LocalRegion
    from kvrelay.transfer.control import PeerConn
    from kvrelay.transfer.handle import Handle

SLICE_S = 0.02  # a waiting thread checks the deadline and the peer's liveness this often
SCRATCH_BYTES = 1 << 20
_enc = msgspec.msgpack.Encoder()
_WOULD_BLOCK = (BlockingIOError, InterruptedError, socket.timeout)


def set_slices(sock: socket.socket, seconds: float) -> None:
    """Kernel timeouts on a blocking socket: a blocking recv/send returns EAGAIN after ``seconds`` (one
    syscall, where a Python-level timeout polls first)."""
    tv = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


class SockXfer:
    """One transfer on a `DataConn`: its request's place in the stream and its reply's receiving state."""

    __slots__ = ("dc", "conn", "op", "xid", "handle", "landing", "views", "plan", "dests", "phase", "got",
                 "err", "i")

    handle: Handle

    def __init__(self, dc: DataConn, conn: PeerConn, op: str, xid: int, views: list[memoryview],
                 plan: list[tuple[int, int, int, bytes]] | None) -> None:
        self.dc = dc
        self.conn = conn
        self.op = op
        self.xid = xid
        self.landing = threading.RLock()
        self.views = views        # local memory: a read's destination, a write's source (descriptor order)
        self.plan = plan          # with encryption: the sealed chunks
        self.dests: list[memoryview] = []  # plain reads: what is still to be received
        self.phase = 0            # 0 header, 1 error text, 2 payload
        self.got = 0
        self.err = bytearray()
        self.i = 0                # encrypted payloads: the chunk being received

    def progress(self, timeout: float) -> None:
        self.dc.drive(self, timeout)

    def abort(self, state: XferState) -> None:
        with self.landing:  # waits out a receive into the caller's memory already under way
            pass


class DataConn:
    """One data socket to a peer (see the module docstring)."""

    def __init__(self, sock: socket.socket, zsock: zmq.Socket, session: ClientSession | None, peer_name: str,
                 encrypt: bool, regions: dict[int, LocalRegion]) -> None:
        self.sock = sock
        self.zsock = zsock
        self.session = session
        self.peer_name = peer_name
        self._regions = regions
        key = session.key if session is not None else b""
        self.sealer = ChunkSealer(key, TO_SERVER) if encrypt else None
        self.opener = ChunkOpener(key, TO_CLIENT) if encrypt else None
        self.send_lock = threading.RLock()  # RLock: a send that fails closes the socket under it
        self.recv_lock = threading.Lock()
        self.outq: collections.deque[Iterator[list[memoryview]]] = collections.deque()
        self.out: list[memoryview] = []
        self.inq: collections.deque[SockXfer] = collections.deque()
        self.broken = ""
        self.closed = False
        self.hbuf = bytearray(REP.size)
        self.scratch = memoryview(bytearray(SCRATCH_BYTES))
        self.sealed = memoryview(bytearray(SEAL_CHUNK + SEAL_BYTES)) if encrypt else memoryview(b"")
        self.sealbuf = memoryview(bytearray(SEAL_CHUNK + SEAL_BYTES)) if encrypt else memoryview(b"")
        self.poller = select.poll()
        self.poller.register(sock.fileno(), select.POLLIN | select.POLLOUT)

    @property
    def busy(self) -> int:
        return len(self.inq)

    # -- sending ---------------------------------------------------------------------------------
    def submit(self, x: SockXfer, req: DataReq) -> None:
        """Queue ``x``'s request (with keys: its sequence number, in stream order, and its MAC) and send what
        goes without blocking."""
        with self.send_lock:
            if self.broken:
                x.handle.fail(self.broken)
                return
            session = self.session
            tag = b""
            if session is not None:
                req.seq = session.next_seq()
                head = _enc.encode(req)
                tag = session.tag(head)
            else:
                head = _enc.encode(req)
            first = memoryview(REQ.pack(len(head), len(tag)) + tag + head)
            if x.op == "write":
                if self.sealer is not None:
                    self.outq.append(self._sealed_payload(first, x))
                else:
                    self.outq.append(iter([[first] + x.views]))
            else:
                self.outq.append(iter([[first]]))
            self.inq.append(x)
            self._flush(socket.MSG_DONTWAIT)

    def _sealed_payload(self, first: memoryview, x: SockXfer) -> Iterator[list[memoryview]]:
        yield [first]
        assert self.sealer is not None and x.plan is not None
        for i, pos, k, ad in x.plan:
            out = self.sealbuf[:k + SEAL_BYTES]  # one buffer: the next chunk is sealed once this one is sent
            self.sealer.seal_into(x.views[i][pos:pos + k], ad, out)
            yield [out]

    def _flush(self, flags: int) -> bool:
        """Send queued bytes (send_lock held); True once nothing is left."""
        while True:
            if not self.out:
                if not self.outq:
                    return True
                nxt = next(self.outq[0], None)
                if nxt is None:
                    self.outq.popleft()
                    continue
                self.out = nxt
            try:
                sent = self.sock.sendmsg(self.out[:IOV_MAX], [], flags)
            except _WOULD_BLOCK:
                return False
            except OSError as exc:
                self.fail_all(f"the tcp data socket to peer {self.peer_name!r} failed while sending: {exc}")
                return False
            self.out = advance(self.out, sent)

    # -- receiving -------------------------------------------------------------------------------
    def drive(self, target: SockXfer, timeout: float) -> None:
        """Receive replies in order until ``target``'s handle is terminal or ``timeout`` seconds pass."""
        if not self.recv_lock.acquire(timeout=max(0.0, timeout)):
            return
        try:
            until = time.monotonic() + timeout
            handle = target.handle
            while not handle.done:
                if self.broken:
                    handle.fail(self.broken)
                    return
                sending = bool(self.out or self.outq)
                if sending and self.send_lock.acquire(blocking=False):
                    try:
                        sending = not self._flush(socket.MSG_DONTWAIT)
                    finally:
                        self.send_lock.release()
                left = until - time.monotonic()
                if not self.inq:
                    if handle.done:
                        return
                    handle.fail(f"tcp data socket to peer {self.peer_name!r}: no reply is due for this transfer")
                    return
                if sending:  # wait for either direction, then receive without blocking
                    if not self.poller.poll(max(0, min(int(left * 1000), int(SLICE_S * 1000)))):
                        if self._idle(handle, until):
                            return
                        continue
                    flags: int = socket.MSG_DONTWAIT
                else:
                    flags = socket.MSG_DONTWAIT if left < 1e-3 else 0
                try:
                    self._recv_step(self.inq[0], flags)
                except _WOULD_BLOCK:
                    if self._idle(handle, until):
                        return
                except OSError as exc:
                    self.fail_all(f"the tcp data socket to peer {self.peer_name!r} failed: {exc}")
        finally:
            self.recv_lock.release()
            if self.broken and not self.closed:
                self._close()

    def _idle(self, handle: Handle, until: float) -> bool:
        """Nothing arrived within a slice: check the peer and the deadline; True to return to the caller."""
        conn = self.inq[0].conn if self.inq else None
        if conn is not None and conn.exited():
            self.fail_all(conn.reason or f"peer {conn.peer.name!r} (pid {conn.peer.info.pid}) exited")
        handle.expire_if_due()
        return time.monotonic() >= until

    def _recv_step(self, x: SockXfer, flags: int) -> None:
        """One receive for the reply at the head of the queue (``x``), then its state transitions."""
        sock = self.sock
        if x.phase == 0:
            n = sock.recv_into(memoryview(self.hbuf)[x.got:], 0, flags)
            if n == 0:
                raise ConnectionResetError(errno.ECONNRESET, "the peer closed the connection")
            x.got += n
            if x.got < REP.size:
                return
            xid, err_len = REP.unpack(self.hbuf)
            if xid != x.xid and xid != 0:
                self.fail_all(f"the tcp data socket to peer {self.peer_name!r} answered transfer {xid} where "
                              f"{x.xid} was due")
                return
            x.got = 0
            if err_len or xid == 0:  # xid 0: the server refused the connection itself
                x.phase, x.err = 1, bytearray(max(err_len, 0))
                if not err_len:
                    x.err = bytearray(b"the peer refused the data socket")
                    self._reply_done(x, refuse_conn=True)
                return
            if x.op == "write":
                self._reply_done(x)
                return
            x.phase = 2
            x.dests = list(x.views)
            return
        if x.phase == 1:
            n = sock.recv_into(memoryview(x.err)[x.got:], 0, flags)
            if n == 0:
                raise ConnectionResetError(errno.ECONNRESET, "the peer closed the connection")
            x.got += n
            if x.got == len(x.err):
                self._reply_done(x, refuse_conn=REP.unpack(self.hbuf)[0] == 0)
            return
        if x.plan is not None:
            self._recv_sealed(x, flags)
            return
        with x.landing:
            if x.handle.done:  # cancelled or expired: the rest goes to scratch
                left = sum(d.nbytes for d in x.dests)
                n = sock.recv_into(self.scratch[:min(left, self.scratch.nbytes)], 0, flags)
            elif len(x.dests) == 1:
                n = sock.recv_into(x.dests[0], 0, flags)
            else:
                n = sock.recvmsg_into(x.dests[:IOV_MAX], 0, flags)[0]
        if n == 0:
            raise ConnectionResetError(errno.ECONNRESET, "the peer closed the connection")
        x.dests = advance(x.dests, n)
        if not x.dests:
            self._reply_done(x)

    def _recv_sealed(self, x: SockXfer, flags: int) -> None:
        assert x.plan is not None and self.opener is not None
        i, pos, k, ad = x.plan[x.i]
        buf = self.sealed[:k + SEAL_BYTES]
        n = self.sock.recv_into(buf[x.got:], 0, flags)
        if n == 0:
            raise ConnectionResetError(errno.ECONNRESET, "the peer closed the connection")
        x.got += n
        if x.got < k + SEAL_BYTES:
            return
        x.got = 0
        plain = self.scratch[:k]
        if not self.opener.open_into(buf, ad, plain):
            self.fail_all(f"read from peer {self.peer_name!r}: an encrypted chunk that does not authenticate "
                          f"(tampered, reordered or replayed) was refused and not written")
            return
        with x.landing:
            if not x.handle.done:
                x.views[i][pos:pos + k] = plain
        x.i += 1
        if x.i == len(x.plan):
            self._reply_done(x)

    def _reply_done(self, x: SockXfer, refuse_conn: bool = False) -> None:
        self.inq.popleft()
        if x.err:
            message = x.err.decode(errors="replace")
            if refuse_conn:
                self.fail_all(f"peer {self.peer_name!r} refused the tcp data socket: {message}")
            x.handle.fail(f"peer {self.peer_name!r} refused the {x.op}: {message}")
            return
        x.handle.finish(XferState.DONE)

    # -- failure and closing ---------------------------------------------------------------------
    def fail_all(self, reason: str) -> None:
        """The socket is unusable: fail every transfer waiting on it and shut it down (any thread)."""
        if not self.broken:
            self.broken = reason
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a receive blocked on it
        except OSError:
            pass
        while self.inq:
            try:
                x = self.inq.popleft()
            except IndexError:
                break
            x.handle.fail(reason)
        if self.recv_lock.acquire(blocking=False):
            try:
                self._close()
            finally:
                self.recv_lock.release()

    def _close(self) -> None:  # recv_lock held (or nobody else can use the socket)
        with self.send_lock:
            if self.closed:
                return
            self.closed = True
            self.outq.clear()
            self.out = []
        self.sock.close()
        self.zsock.close(0)


def local_views(regions: dict[int, LocalRegion], descs: list[Desc]) -> list[memoryview]:
    return [regions[d.local_region].view[d.local_offset:d.local_offset + d.length] for d in descs]
