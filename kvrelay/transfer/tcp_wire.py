"""The byte layout of the tcp transport's plain data sockets, shared by both ends.

Owns: the fixed headers (`BIND`, `REQ`, `REP`), their limits, the encrypted chunk plan (`seal_plan`, the
associated data of each chunk) and `recv_exact` for the serving side's blocking reads.  Must not touch:
sessions or keys (kvrelay/security/dataplane.py), handles, regions.

A connection carries, in order:
  client -> server  BIND (magic, sid length, tag length) + sid + tag: the session this socket belongs to
                    (empty sid and tag without keys)
  server -> client  REP (xid 0, error length) + error: '' accepts the socket, anything else refuses it
and then requests, answered in order (a client may pipeline them):
  client -> server  REQ (head length, tag length) + tag + head (msgpack `DataReq`), then a write's payload
  server -> client  REP (xid, error length) + error, then (a read without error) its payload
A payload is the ranges' bytes in descriptor order, or with encryption the `seal_plan` chunks, each its
ciphertext followed by its SEAL_BYTES tag.
"""

from __future__ import annotations

import socket
import struct

BIND = struct.Struct("<4sHH")
BIND_MAGIC = b"KVRB"
REQ = struct.Struct("<II")
REP = struct.Struct("<QI")
MAX_HEAD = 1 << 20   # a request head (msgpack ranges) longer than this is refused and the socket closed
MAX_TAG = 64
MAX_ERROR = 1 << 16
SEAL_CHUNK = 256 << 10  # encrypted payloads: bytes per sealed chunk
_AD = struct.Struct("<QQQQ")


def seal_plan(ranges: list[tuple[int, int, int]], xid: int,
              chunk: int = SEAL_CHUNK) -> list[tuple[int, int, int, bytes]]:
    """(range index, offset in the range, length, associated data) of each sealed chunk, in wire order.
    The associated data is the chunk's address on the serving side: (transfer id, region, offset, length)."""
    out = []
    for i, (rid, off, n) in enumerate(ranges):
        for pos in range(0, n, chunk):
            k = min(chunk, n - pos)
            out.append((i, pos, k, _AD.pack(xid, rid, off + pos, k)))
    return out


def recv_exact(sock: socket.socket, buf: memoryview) -> bool:
    """Fill ``buf`` from a blocking socket; False if the peer closed it first."""
    got, n = 0, buf.nbytes
    while got < n:
        k = sock.recv_into(buf[got:])
        if k == 0:
            return False
        got += k
    return True


def tune(sock: socket.socket, buffer_bytes: int) -> None:
    """TCP_NODELAY (small messages go out at once) and, when asked, fixed socket buffers."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if buffer_bytes > 0:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)


IOV_MAX = 512  # buffers per sendmsg/recvmsg_into call (the kernel's limit is 1024)


def advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    """``bufs`` without their first ``n`` bytes."""
    i = 0
    while n and i < len(bufs):
        k = bufs[i].nbytes
        if n < k:
            return [bufs[i][n:]] + bufs[i + 1:]
        n -= k
        i += 1
    return bufs[i:]


def send_all(sock: socket.socket, bufs: list[memoryview]) -> None:
    """Scatter-gather send of ``bufs`` on a blocking socket (no copy into one buffer)."""
    while bufs:
        sent = sock.sendmsg(bufs[:IOV_MAX])
        bufs = advance(bufs, sent)
