"""The far side of `kvrelay bench transports`: a process that serves one transport or raw primitive.

    python -m kvrelay.transfer.bench_peer KIND NBYTES [HOST [KEYS_DIR]]

HOST is the address it binds and advertises (default 127.0.0.1; `kvrelay bench hosts` gives a veth's address
in a network namespace).  KIND is a kvrelay transport (shm, tcp, nixl), the tcp transport with the keys in
KEYS_DIR (``tcp-auth``: authenticated, a MAC per request; ``tcp-encrypt``: encrypted data sockets), or a raw
baseline: ``socket`` (loopback TCP socket),
``zmq`` (pyzmq ROUTER, zero-copy replies, 1 MiB frames), ``nixl-raw`` (a bare NIXL agent) or
``mooncake`` (Mooncake's transfer engine over TCP).  Prints one JSON line describing how to reach it,
then serves until stdin closes (a kvrelay transport is then closed).  Owns: the serving side of every baseline.  Must not touch: the
transports' internals (it uses their public API only).
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading

import numpy as np

RAW_FRAME = 1 << 20
TRANSPORT_KINDS = ("shm", "tcp", "nixl", "tcp-auth", "tcp-encrypt")  # served by a kvrelay endpoint
_REQ = struct.Struct("<cQ")  # op (b"r" | b"w"), nbytes


def _serve_socket(buf: np.ndarray, host: str = "127.0.0.1") -> dict:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, 0))
    srv.listen(4)
    mv = buf.data  # a memoryview of the array (typed as one, unlike memoryview(buf) before Python 3.12)

    def client(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = bytearray(_REQ.size)
        while True:
            if conn.recv_into(head, _REQ.size, socket.MSG_WAITALL) != _REQ.size:
                return
            op, n = _REQ.unpack(head)
            if op == b"r":
                conn.sendall(mv[:n])
            else:
                got = 0
                while got < n:
                    k = conn.recv_into(mv[got:n])
                    if not k:
                        return
                    got += k
                conn.sendall(b"k")

    def accept() -> None:
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=client, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return {"port": srv.getsockname()[1], "host": host}


def _serve_zmq(buf: np.ndarray) -> dict:
    import zmq
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    mv = buf.data  # a memoryview of the array (typed as one, unlike memoryview(buf) before Python 3.12)

    def loop() -> None:
        while True:
            ident = sock.recv()
            op, n = _REQ.unpack(sock.recv())
            if op == b"r":
                sock.send(ident, zmq.SNDMORE)
                offs = list(range(0, n, RAW_FRAME))
                for i, off in enumerate(offs):
                    part = mv[off:min(n, off + RAW_FRAME)]
                    sock.send(part, zmq.SNDMORE if i < len(offs) - 1 else 0, copy=part.nbytes < 65536)
            else:
                off = 0
                while sock.getsockopt(zmq.RCVMORE):
                    off += sock.recv_into(mv[off:off + RAW_FRAME])
                sock.send_multipart([ident, b"k"])

    threading.Thread(target=loop, daemon=True).start()
    return {"port": port}


def _serve_nixl_raw(buf: np.ndarray) -> dict:
    from kvrelay.transfer.nixl_transport import make_agent
    agent = make_agent("bench-raw-target", 1000)
    agent.create_backend("UCX", {"ucx_error_handling_mode": "peer"})
    agent.register_memory([(buf.ctypes.data, buf.nbytes, 0, "")], "DRAM")
    _serve_nixl_raw.keep = agent  # type: ignore[attr-defined]
    return {"meta": agent.get_agent_metadata().hex(), "address": buf.ctypes.data}


def _serve_mooncake(buf: np.ndarray, host: str = "127.0.0.1") -> dict:
    from mooncake.engine import TransferEngine
    te = TransferEngine()
    if te.initialize(host, "P2PHANDSHAKE", "tcp", "") != 0:
        raise RuntimeError("mooncake TransferEngine.initialize failed")
    if te.register_memory(buf.ctypes.data, buf.nbytes) != 0:
        raise RuntimeError("mooncake register_memory failed")
    _serve_mooncake.keep = te  # type: ignore[attr-defined]
    return {"target": f"{host}:{te.get_rpc_port()}", "address": buf.ctypes.data}


def _serve_transport(kind: str, nbytes: int, host: str = "127.0.0.1", keys_dir: str = "") -> dict:
    from kvrelay import security
    from kvrelay.transfer import create_transport
    name, _, mode = kind.partition("-")
    if mode and not keys_dir:
        raise SystemExit(f"bench peer kind {kind!r} needs a KEYS_DIR argument (`kvrelay keys DIR` writes one)")
    options = {"encrypt": True} if mode == "encrypt" else {}
    with security.using(security.load(keys_dir) if mode else None):
        ep = create_transport(name, f"bench-{kind}-target", "bench", host, **options)
    info, view = ep.alloc(nbytes)
    if not isinstance(view, memoryview):
        raise ValueError(f"the bench peer serves host memory; transport {kind!r} allocated a {type(view).__name__}")
    np.frombuffer(view, np.uint8)[:] = 7
    _serve_transport.keep = ep  # type: ignore[attr-defined]
    return {"address": ep.address, "region": info.region_id}


def main() -> None:
    kind, nbytes = sys.argv[1], int(sys.argv[2])
    host = sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1"
    if kind in TRANSPORT_KINDS:
        meta = _serve_transport(kind, nbytes, host, sys.argv[4] if len(sys.argv) > 4 else "")
    else:
        buf = np.full(nbytes, 7, dtype=np.uint8)  # lives until the peer exits: NIXL and Mooncake keep its address
        if kind == "socket":
            meta = _serve_socket(buf, host)
        elif kind == "mooncake":
            meta = _serve_mooncake(buf, host)
        elif kind == "zmq":
            meta = _serve_zmq(buf)
        elif kind == "nixl-raw":
            meta = _serve_nixl_raw(buf)
        else:
            raise SystemExit(f"unknown bench peer kind {kind!r}")
    print(json.dumps({"kind": kind, **meta}), flush=True)
    sys.stdin.read()
    ep = getattr(_serve_transport, "keep", None)
    if ep is not None:
        ep.close()  # unlinks its shared-memory segments (a killed peer leaves them to the next sweep)


if __name__ == "__main__":
    main()
