"""A client thread's link to the daemon: the same-host Unix socket (local.py's peer) or a ZMQ DEALER.

Both send one encoded request and receive one encoded reply at a time, and both notice at once when the
daemon's end goes away (`LinkClosed`): the Unix socket by its end of file, the DEALER by a monitor of
its disconnect events and of refused connection attempts (a daemon that is not there: a request fails in
milliseconds instead of waiting out its timeout; ZMQ keeps retrying, so a restarted daemon is found).  Must not touch: what the messages mean (control.py, client.py).
"""

from __future__ import annotations

import socket
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from kvrelay.security import Keys
from kvrelay.store.local import FRAME, MAX_FRAME, RECV_BYTES, to_sockaddr


_REFUSED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_NEVER_ANSWERED = (" before answering anything: if the daemon runs with --keys, this client needs the same key "
                   "directory (--keys DIR or KVRELAY_KEYS)")
_PEEK_NOWAIT = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)  # an int: flag enums cost microseconds per call


class LinkClosed(Exception):
    """The daemon's end of the link went away (it exited or restarted)."""


class ZmqLink:
    kind = "zmq"
    gen = 0  # the client's link generation it was opened in (control.py)

    def __init__(self, ctx: zmq.Context, address: str, keys: Keys | None = None) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:  # CURVE client of a daemon started with the same --keys
            keys.client_socket(self.sock)
        self.mon = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED | _REFUSED)
        self.sock.connect(address)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.mon, zmq.POLLIN)
        self.answered = False  # a disconnect before any answer may be a refused authentication

    def usable(self) -> bool:
        while self.mon.poll(0):  # a disconnect from before this request (a restart since) is not this one's
            self.mon.recv_multipart()
        return True  # ZMQ reconnects by itself

    def send(self, data: bytes) -> None:
        self.sock.send(data)

    def recv(self, timeout: float) -> bytes | None:
        """The next reply, or None if none came within ``timeout`` seconds."""
        # past the deadline still one look (poll 0): a thread that got no CPU until after its deadline must not
        # call a reply that is already here a timeout
        events = dict(self.poller.poll(int(timeout * 1000) + 1 if timeout > 0 else 0))
        if self.sock in events:
            self.answered = True
            return self.sock.recv()
        if self.mon in events:
            lost = ""
            while self.mon.poll(0):  # a disconnect, or a connection attempt refused: nobody will answer
                event = recv_monitor_message(self.mon)["event"]
                if event == zmq.EVENT_DISCONNECTED:
                    lost = "the daemon closed the connection" + ("" if self.answered else _NEVER_ANSWERED)
                elif event == zmq.EVENT_CONNECT_RETRIED:
                    lost = lost or "nothing accepts connections there"
                elif event & _REFUSED:
                    lost = ("the daemon refused the handshake: authentication (it runs with --keys and this "
                            "client has none or another key directory's, or the other way round)")
            if lost:
                raise LinkClosed(lost)
        return None

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.mon.close(linger=0)
        self.sock.close(linger=0)


class UnixLink:
    kind = "local"
    gen = 0

    def __init__(self, name: str, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(to_sockaddr(name))
        except OSError:
            self.sock.close()
            raise
        self.buf = bytearray()
        self.timeout = timeout
        self._rbuf = memoryview(bytearray(RECV_BYTES))

    def usable(self) -> bool:
        """False once the daemon has closed its end (it exited): the caller opens a new link."""
        self.sock.settimeout(0.0)  # a socket with a timeout would wait for data before even a MSG_DONTWAIT peek
        try:
            return self.sock.recv(1, _PEEK_NOWAIT) != b""
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False

    def send(self, data: bytes) -> None:
        if len(data) > MAX_FRAME:
            raise ValueError(f"a store request of {len(data)} bytes exceeds the {MAX_FRAME}-byte limit; "
                             f"split it (fewer keys per call)")
        self.sock.settimeout(self.timeout)  # a daemon that stops reading fails the send instead of hanging it
        try:
            self.sock.sendall(FRAME.pack(len(data)) + data)
        except OSError as exc:  # (a timeout included: the link's state is unknown after a partial frame)
            raise LinkClosed from exc

    def recv(self, timeout: float) -> bytes | None:
        deadline = time.monotonic() + timeout
        looked = False
        while True:
            buf = self.buf
            if len(buf) >= FRAME.size:
                (n,) = FRAME.unpack_from(buf, 0)
                if len(buf) >= FRAME.size + n:
                    msg = bytes(buf[FRAME.size:FRAME.size + n])
                    del buf[:FRAME.size + n]
                    return msg
            left = deadline - time.monotonic()
            if left <= 0 and looked:
                return None
            looked = True  # past the deadline still one look without waiting (a starved thread's reply is here)
            self.sock.settimeout(max(left, 0.0))  # recv then waits in poll(2): one call, no exception on the fast path
            try:
                n = self.sock.recv_into(self._rbuf)  # one reused buffer: recv(n) allocates n bytes per call
            except (TimeoutError, BlockingIOError, InterruptedError):
                return None
            except OSError as exc:
                raise LinkClosed from exc
            if not n:
                raise LinkClosed
            buf += self._rbuf[:n]

    def close(self) -> None:
        self.sock.close()


Link = ZmqLink | UnixLink  # what a thread talks to the daemon through (both: usable, send, recv, close)
