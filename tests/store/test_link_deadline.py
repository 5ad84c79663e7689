"""A store link called after its deadline still reads a reply that is already there: a client thread that got no
CPU until after its deadline (a busy host) must not report an answered request as the store's silence.  Both
link kinds: the same-host Unix socket and ZeroMQ."""

from __future__ import annotations

import socket
import uuid

import zmq

from kvrelay.store.links import UnixLink, ZmqLink
from kvrelay.store.local import FRAME, to_sockaddr


def test_a_unix_link_past_its_deadline_reads_the_reply_already_there():
    name = f"@kvrelay-test-link-{uuid.uuid4().hex}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(to_sockaddr(name))
    server.listen(1)
    try:
        link = UnixLink(name, timeout=2.0)
        conn, _ = server.accept()
        try:
            assert link.recv(0.0) is None  # nothing sent yet: no wait, no reply
            conn.sendall(FRAME.pack(5) + b"hello")
            conn.sendall(FRAME.pack(3) + b"bye")
            assert link.recv(-1.0) == b"hello"  # the deadline passed long ago: still one look
            assert link.recv(0.0) == b"bye"
            assert link.recv(-1.0) is None
        finally:
            conn.close()
            link.close()
    finally:
        server.close()


def test_a_zmq_link_past_its_deadline_reads_the_reply_already_there():
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    link = ZmqLink(ctx, f"tcp://127.0.0.1:{port}")
    try:
        link.send(b"ping")
        ident, body = router.recv_multipart()
        assert body == b"ping"
        router.send_multipart([ident, b"pong"])
        got = None
        for _ in range(200):  # the reply crosses ZeroMQ's I/O threads: look until it is in (every look waits 0)
            got = link.recv(-1.0)
            if got is not None:
                break
            zmq.Poller().poll(10)
        assert got == b"pong"
    finally:
        link.close()
        router.close(linger=0)
        ctx.term()
