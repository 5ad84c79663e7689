"""The client's control channel to a `kvrelay store` daemon: sockets, round trips, pipelined replies.

Owns: one link per calling thread (links.py: the daemon's same-host Unix socket, or a ZMQ DEALER; a pull
that waits does not block other threads), which fails a wait at once when the daemon's end goes away (it
died: no answer will come), request ids,
pins handed back with the next request, replies to pipelined (wait=False) requests and their deferred
errors, and the one retry after the daemon says it does not know the socket (code "session").  Must not
touch: what the requests mean (client.py) or the data path.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, overload

import zmq

from kvrelay import security
from kvrelay.keys import ChunkKey
from kvrelay.store import protocol as P
from kvrelay.store.errors import StoreCode, StoreError, StoreFullError
from kvrelay.store.links import Link, LinkClosed, UnixLink, ZmqLink
from kvrelay.transfer.wire import ChunkHeader


# Pipelined commits per CommitMany message: a layer's chunks for a few requests.  One message for a layer's
# commits instead of one each, with the same-host socket, took a pipelined commit from about 55 to about
# 13 us per chunk here (48 commits per flush; both ends are Python).
COMMIT_BATCH = 64


@dataclass
class CommitQueue:
    """A thread's pipelined commits, not sent yet (they go as one CommitMany)."""
    keys: list[ChunkKey] = field(default_factory=list)
    headers: list[ChunkHeader] = field(default_factory=list)


def reply_error(rep: P.Reply) -> Exception:
    """The exception the client raises for a refusal: `StoreFullError` for FULL, `TimeoutError` for TIMEOUT,
    else `StoreError` with the reply's code (a code this client does not know is kept as its string)."""
    if rep.code == StoreCode.FULL:
        return StoreFullError(rep.error, StoreCode.FULL)
    if rep.code == StoreCode.TIMEOUT:
        return TimeoutError(rep.error)
    return StoreError(rep.error, rep.code)


class ControlChannel:
    """Base of StoreClient.  Subclasses set ``address``, ``timeout``, ``_closed``, ``_ready`` and implement
    ``_hello(link)`` (introduce a link; called for every new thread's link once the client is set up,
    and again when the daemon answers "session").  Once the daemon's hello names a same-host socket
    (``info["local"]``) and ``control`` allows it, each thread's link is that Unix socket (links.py: a
    round trip of about 20 us instead of about 160 us over ZMQ here); otherwise, or if it cannot be
    reached, a ZMQ DEALER."""

    address: str
    timeout: float
    _closed: bool
    _ready = False  # set once the client is set up: from then on new links say hello by themselves
    _link_gen = 0  # links of an older generation are reopened (after the daemon restarted)
    control = "auto"  # "auto": the daemon's same-host socket when it offers one; "zmq": ZMQ only
    info: dict[str, Any] = {}

    def _open_channel(self) -> None:
        self.keys = security.current()  # CURVE on every ZMQ link when keys are on (kvrelay.security)
        self._ctx = zmq.Context()
        self._tls = threading.local()
        self._links: list[Link] = []  # every thread's link, closed with the client
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._unpin: list[int] = []
        self._touched: list[str] = []  # chunk ids pulled through the shared directory, not yet reported
        self._touched_since = 0.0  # when the oldest of them was pulled
        self._commit_queues: list[CommitQueue] = []  # every thread's queue of pipelined commits

    def _hello(self, link: Link) -> None:
        raise NotImplementedError

    def _sock(self) -> Link:
        """This thread's link to the daemon (opened on first use, and again after the daemon went away)."""
        link = getattr(self._tls, "link", None)
        if link is not None and link.usable() and getattr(link, "gen", 0) == self._link_gen:
            return link
        if self._closed:
            raise StoreError("the StoreClient is closed", StoreCode.CLOSED)
        if link is not None:  # the daemon closed it (exited or restarted): a fresh one says hello again
            self._drop_link(link)
        link = None
        name = self.info.get("local") if self.control == "auto" else ""
        if name:
            try:
                link = UnixLink(name, self.timeout)
            except OSError:  # not reachable (e.g. a restarted daemon without it): ZMQ serves everyone
                link = None
        if link is None:
            link = ZmqLink(self._ctx, self.address, self.keys)
        link.gen = self._link_gen
        self._tls.link = link
        with self._lock:
            self._links.append(link)
        if self._ready:  # a new thread's link: introduce it (namespace for commits)
            self._hello(link)
        return link

    def drop_thread_link(self) -> None:
        """Close this thread's link (a short-lived thread, such as a breaker's probe, must not leave one)."""
        link = getattr(self._tls, "link", None)
        if link is not None:
            self._drop_link(link)

    def _drop_link(self, link: Link) -> None:
        if getattr(self._tls, "link", None) is link:
            self._tls.link = None
        with self._lock:
            if link in self._links:
                self._links.remove(link)
        link.close()

    def _call(self, req: P.Req, wait: float | None = None, late: StoreCode = StoreCode.UNREACHABLE) -> P.Reply:
        """``late``: the error code when no answer came within ``wait`` ("timeout" for a wait the caller bounded
        by its own deadline: a slow daemon is not a dead one)."""
        sock = self._sock()
        self._send_commits(sock)  # this thread's queued commits go first: what it asks next may depend on them
        return self._roundtrip(sock, req, self.timeout if wait is None else wait, late)

    def _queue_commit(self, key: ChunkKey, header: ChunkHeader) -> None:
        """A pipelined commit: queued on this thread, sent with others as one `CommitMany` once COMMIT_BATCH
        are queued, by `flush()`, or before this thread's next request."""
        q: CommitQueue | None = getattr(self._tls, "commits", None)
        if q is None:
            q = self._tls.commits = CommitQueue()
            with self._lock:
                self._commit_queues.append(q)  # close() sends what any thread left queued
        q.keys.append(key)
        q.headers.append(header)
        if len(q.keys) >= COMMIT_BATCH:
            self._send_commits(self._sock())

    def _queued_commits(self, all_threads: bool = False) -> int:
        if all_threads:
            with self._lock:
                return sum(len(q.keys) for q in self._commit_queues)
        q: CommitQueue | None = getattr(self._tls, "commits", None)
        return len(q.keys) if q is not None else 0

    def _send_commits(self, sock: Link, q: CommitQueue | None = None) -> None:
        """Send a queue of commits (default: this thread's) as one CommitMany, answered like a pipelined
        request on ``sock``."""
        q = getattr(self._tls, "commits", None) if q is None else q
        if q is None or not q.keys:
            return
        keys, headers = q.keys, q.headers
        q.keys, q.headers = [], []
        self._pipeline(sock, P.CommitMany(keys=keys, headers=headers), "Commit")

    def _send_all_commits(self) -> None:
        """Every thread's queued commits, from this thread (at close: a publisher thread that queued commits
        and never flushed does not lose them)."""
        sock = self._sock()
        with self._lock:
            queues = list(self._commit_queues)
        for q in queues:
            self._send_commits(sock, q)

    def _post(self, sock: Link, req: P.Req) -> None:
        """Send ``req`` with a fresh id and the pins (and, but with a hello, the touched ids) waiting to go."""
        req.req_id = next(self._ids)
        with self._lock:
            if not isinstance(req, P.Hello):  # a hello's link may be unknown to the daemon: it would drop them
                req.unpin, self._unpin = self._unpin, []
                req.touched, self._touched = self._touched, []
        pending = self._pending()
        try:
            sock.send(P.encode(req))
        except LinkClosed:
            pending.clear()
            self._drop_link(sock)
            with self._lock:  # not delivered: they go with the next request that is
                self._touched[:0] = req.touched
                self._unpin[:0] = req.unpin
            raise StoreError(f"lost the connection to the store at {self.address} while sending "
                             f"{type(req).__name__} (the daemon exited?)", StoreCode.UNREACHABLE) from None

    def _pipeline(self, sock: Link, req: P.Req, name: str) -> None:
        """Send ``req`` and do not wait: its answer is read with a later one's, and an error is raised then
        (as "an earlier {name}(wait=False) failed")."""
        self._post(sock, req)
        self._pending()[req.req_id] = name

    def _roundtrip(self, sock: Link, req: P.Req, wait: float, late: StoreCode = StoreCode.UNREACHABLE) -> P.Reply:
        """Send ``req`` and wait up to ``wait`` seconds for its answer (raised if it is an error)."""
        self._post(sock, req)
        rep = self._recv_until(sock, req.req_id, wait, type(req).__name__, late)
        if not rep.ok and rep.code == StoreCode.SESSION and not isinstance(req, P.Hello) and self._ready:
            self._hello(sock)  # the daemon does not know this socket (it restarted): introduce it, retry once
            req.unpin = []  # pins of the daemon that forgot this socket mean nothing to it (touched ids may)
            req.req_id = next(self._ids)
            sock.send(P.encode(req))
            rep = self._recv_until(sock, req.req_id, wait, type(req).__name__, late)
        self._raise_deferred()
        return self._check(rep)

    def _pending(self) -> dict[int, str]:
        p = getattr(self._tls, "pending", None)
        if p is None:
            p = self._tls.pending = {}
            self._tls.deferred = []
        return p

    @overload
    def _recv_until(self, sock: Link, req_id: int, wait: float, what: str, late: StoreCode = ...) -> P.Reply: ...
    @overload
    def _recv_until(self, sock: Link, req_id: None, wait: float, what: str, late: StoreCode = ...) -> None: ...

    def _recv_until(self, sock: Link, req_id: int | None, wait: float, what: str,
                    late: StoreCode = StoreCode.UNREACHABLE) -> P.Reply | None:
        """Receive replies until the one for ``req_id`` (None: until no pipelined request is pending)."""
        pending = self._pending()
        deadline = time.monotonic() + wait
        while req_id is not None or pending:
            try:
                data = sock.recv(deadline - time.monotonic())
            except LinkClosed as exc:
                pending.clear()  # their answers will not come either
                self._drop_link(sock)
                why = f": {exc}" if str(exc) else ""
                raise StoreError(f"lost the connection to the store at {self.address} while waiting for {what}"
                                 f"{why} (the daemon exited?)", StoreCode.UNREACHABLE) from None
            if data is None:
                if time.monotonic() >= deadline:
                    if late == StoreCode.TIMEOUT:
                        raise StoreError(f"store at {self.address} did not answer {what} by its deadline "
                                         f"(+{wait:.1f}s wait): it is slow or stuck", StoreCode.TIMEOUT)
                    raise StoreError(f"store at {self.address} did not answer {what} within {wait:.1f}s: is the "
                                     f"daemon running?", StoreCode.UNREACHABLE)
                continue
            rep = P.decode_reply(data)
            if rep.req_id in pending:  # the answer to a pipelined commit(wait=False)
                name = pending.pop(rep.req_id)
                if not rep.ok:
                    self._tls.deferred.append((name, rep))
            elif rep.req_id == req_id or rep.req_id == -1:
                return rep
            elif rep.slots:  # a late answer to an earlier pull that timed out: the daemon pinned its chunks
                with self._lock:  # for a copy no one makes; they go back with the next request (issue 26)
                    self._unpin.extend(s.pin for s in rep.slots if s.pin > 0)
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
            raise reply_error(rep)
        return rep

    def flush(self, timeout: float | None = None) -> None:
        """Send this thread's queued ``commit(wait=False)``s and wait until every one is answered; raise the
        first failure."""
        sock = self._sock()
        self._send_commits(sock)
        self._recv_until(sock, None, self.timeout if timeout is None else timeout, "pipelined commits")
        self._raise_deferred()

    def _close_sockets(self) -> None:
        self._closed = True
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close()
        self._ctx.term()
