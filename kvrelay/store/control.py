"""The client's control channel to a `kvrelay store` daemon: sockets, round trips, pipelined replies.

Owns: one DEALER socket per calling thread (a pull that waits does not block other threads) with a monitor
that fails a wait at once when the daemon's end disconnects (it died: no answer will come), request ids,
pins handed back with the next request, replies to pipelined (wait=False) requests and their deferred
errors, and the one retry after the daemon says it does not know the socket (code "session").  Must not
touch: what the requests mean (client.py) or the data path.
"""

from __future__ import annotations

import itertools
import threading
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from kvrelay.store import protocol as P


class StoreError(RuntimeError):
    """The store refused a request or could not be reached; ``code`` says why (see protocol.Reply)."""

    def __init__(self, message: str, code: str = "error") -> None:
        super().__init__(message)
        self.code = code


class StoreFullError(StoreError):
    """Admission refused: the pool cannot hold the request's chunks even after eviction."""


class ControlChannel:
    """Base of StoreClient.  Subclasses set ``address``, ``timeout``, ``_closed``, ``_ready`` and implement
    ``_hello(sock)`` (introduce a socket; called for every new thread's socket once the client is set up,
    and again when the daemon answers "session")."""

    _ready = False  # set once the client is set up: from then on new sockets say hello by themselves

    def _open_channel(self) -> None:
        self._ctx = zmq.Context()
        self._tls = threading.local()
        self._socks: list[zmq.Socket] = []  # DEALER sockets and their monitors
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._unpin: list[int] = []

    def _hello(self, sock: zmq.Socket) -> None:
        raise NotImplementedError

    def _sock(self) -> zmq.Socket:
        s = getattr(self._tls, "sock", None)
        if s is None:
            if self._closed:
                raise StoreError("the StoreClient is closed", "closed")
            s = self._ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            mon = s.get_monitor_socket(zmq.EVENT_DISCONNECTED)  # the daemon's end went away: fail waits now
            s.connect(self.address)
            poller = zmq.Poller()
            poller.register(s, zmq.POLLIN)
            poller.register(mon, zmq.POLLIN)
            self._tls.sock, self._tls.mon, self._tls.poller = s, mon, poller
            with self._lock:
                self._socks += [mon, s]
            if self._ready:  # a new thread's socket: introduce it (namespace for commits)
                self._hello(s)
        return s

    def _call(self, req: P.Req, wait: float | None = None) -> P.Reply:
        return self._roundtrip(self._sock(), req, self.timeout if wait is None else wait)

    def _roundtrip(self, sock: zmq.Socket, req: P.Req, wait: float, expect_reply: bool = True) -> P.Reply | None:
        req.req_id = next(self._ids)
        with self._lock:
            req.unpin, self._unpin = self._unpin, []
        mon = self._tls.mon
        while mon.poll(0):  # a disconnect from before this request (e.g. a restart since) is not this one's
            mon.recv_multipart()
        sock.send(P.encode(req))
        pending = self._pending()
        if not expect_reply:
            pending[req.req_id] = type(req).__name__
            return None
        rep = self._recv_until(sock, req.req_id, wait, type(req).__name__)
        if not rep.ok and rep.code == "session" and not isinstance(req, P.Hello) and self._ready:
            self._hello(sock)  # the daemon does not know this socket (it restarted): introduce it, retry once
            req.unpin = []
            req.req_id = next(self._ids)
            sock.send(P.encode(req))
            rep = self._recv_until(sock, req.req_id, wait, type(req).__name__)
        self._raise_deferred()
        return self._check(rep)

    def _pending(self) -> dict[int, str]:
        p = getattr(self._tls, "pending", None)
        if p is None:
            p = self._tls.pending = {}
            self._tls.deferred = []
        return p

    def _recv_until(self, sock: zmq.Socket, req_id: int | None, wait: float, what: str) -> P.Reply | None:
        """Receive replies until the one for ``req_id`` (None: until no pipelined request is pending)."""
        pending = self._pending()
        deadline = time.monotonic() + wait
        mon, poller = self._tls.mon, self._tls.poller
        while req_id is not None or pending:
            left = deadline - time.monotonic()
            events = dict(poller.poll(int(left * 1000) + 1)) if left > 0 else {}
            if mon in events and recv_monitor_message(mon)["event"] == zmq.EVENT_DISCONNECTED:
                pending.clear()  # their answers will not come either
                raise StoreError(f"lost the connection to the store at {self.address} while waiting for {what} "
                                 f"(the daemon exited?)", "unreachable")
            if sock not in events:
                if time.monotonic() >= deadline:
                    raise StoreError(f"store at {self.address} did not answer {what} within {wait:.1f}s: is the "
                                     f"daemon running?", "unreachable")
                continue
            rep = P.decode_reply(sock.recv())
            if rep.req_id in pending:  # the answer to a pipelined commit(wait=False)
                name = pending.pop(rep.req_id)
                if not rep.ok:
                    self._tls.deferred.append((name, rep))
            elif rep.req_id == req_id or rep.req_id == -1:
                return rep
            # else: a late answer to an earlier call that timed out
        return None

    def _raise_deferred(self) -> None:
        deferred = getattr(self._tls, "deferred", None)
        if deferred:
            name, rep = deferred.pop(0)
            try:
                self._check(rep)
            except StoreError as exc:
                raise type(exc)(f"an earlier {name}(wait=False) failed: {exc}", exc.code) from None

    @staticmethod
    def _check(rep: P.Reply) -> P.Reply:
        if not rep.ok:
            if rep.code == "full":
                raise StoreFullError(rep.error, rep.code)
            if rep.code == "timeout":
                raise TimeoutError(rep.error)
            raise StoreError(rep.error, rep.code)
        return rep

    def flush(self, timeout: float | None = None) -> None:
        """Wait for every pipelined ``commit(wait=False)`` of this thread; raise the first failure."""
        self._recv_until(self._sock(), None, self.timeout if timeout is None else timeout, "pipelined commits")
        self._raise_deferred()

    def _close_sockets(self) -> None:
        self._closed = True
        with self._lock:
            for s in self._socks:
                if s.type == zmq.DEALER:
                    try:
                        s.disable_monitor()
                    except zmq.ZMQError:
                        pass
                s.close(linger=0)
            self._socks.clear()
        self._ctx.term()
