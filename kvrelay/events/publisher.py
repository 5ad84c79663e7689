"""`EventPublisher`: a ZeroMQ PUB socket and a replay ROUTER socket that serve KV-event batches.

The data path only calls `publish`, which numbers the batch and appends it to a bounded queue: it never
blocks, never encodes and never touches a socket.  One sender thread owns both sockets: it encodes and
sends each batch as the three frames of `wire`, keeps the last ``buffer_steps`` of them for replay, and
answers replay and snapshot requests (protocol: `kvrelay.events.wire`).  A full queue drops the batch but
not its number, so subscribers see the hole and recover through replay or a snapshot; drops are counted.

Epochs: `start` publishes seq 0 as ``[AllBlocksCleared, <snapshot>]``, so a subscriber that hears a new
publisher (after a restart) drops what it knew of the old one.  Snapshots: ``snapshot`` returns events
that describe all the publisher's owner holds; ``state_lock`` is the owner's lock, held around every
`publish` call that changes that state, so a snapshot and the seq it is numbered with agree exactly.

Endpoints are bound here (``tcp://127.0.0.1:0`` picks a free port: read `endpoint` / `replay_endpoint`
after construction).  A non-loopback host needs authentication on (kvrelay keys); with keys both sockets
are CURVE servers under the plane name ``events``.

Owns: the two server sockets and the send thread.  Must not touch: what the events mean (their owner).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from contextlib import nullcontext
from typing import Any, Callable, ContextManager
from urllib.parse import urlsplit

import zmq

from kvrelay.events.wire import (
    END_SEQ,
    SNAPSHOT_SEQ,
    AllBlocksCleared,
    Event,
    encode_batch,
    encode_seq,
    make_batch,
)
from kvrelay.security.config import check_loopback, current
from kvrelay.security.curve import release as release_zap
from kvrelay.security.keyfiles import Keys

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "tcp://127.0.0.1:0"


def _check_endpoint(endpoint: str, what: str, keys: Keys | None) -> None:
    if not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
        raise ValueError(f"{what} {endpoint!r}: expected tcp://HOST:PORT (or ipc://, inproc://)")
    if endpoint.startswith("tcp://"):
        parts = urlsplit(endpoint)
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None:
            raise ValueError(f"{what} {endpoint!r}: expected tcp://HOST:PORT, e.g. {DEFAULT_ENDPOINT}")
        check_loopback(parts.hostname, what, keys)


class EventPublisher:
    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, replay_endpoint: str | None = DEFAULT_ENDPOINT,
                 topic: str = "", *, buffer_steps: int = 10_000, max_queue: int = 10_000, hwm: int = 100_000,
                 dp_rank: int | None = None, snapshot: Callable[[], list[Event]] | None = None,
                 state_lock: ContextManager[Any] | None = None, keys: Keys | None = None) -> None:
        if buffer_steps < 1 or max_queue < 1:
            raise ValueError(f"buffer_steps ({buffer_steps}) and max_queue ({max_queue}) must be at least 1")
        keys = keys or current()
        _check_endpoint(endpoint, "KV-event publisher endpoint", keys)
        if replay_endpoint is not None:
            _check_endpoint(replay_endpoint, "KV-event replay endpoint", keys)
        self.topic = topic
        self.dp_rank = dp_rank
        self._topic_b = topic.encode()
        self._snapshot = snapshot
        self._state_lock: ContextManager[Any] = state_lock if state_lock is not None else nullcontext()
        self._lock = threading.Lock()
        self._queue: deque[tuple[int, list[Event]]] = deque()
        self._max_queue = max_queue
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._next_seq = 0
        self.counters = {"batches_published": 0, "batches_sent": 0, "batches_dropped": 0, "events_dropped": 0,
                         "replay_requests": 0, "snapshot_requests": 0, "bad_replay_requests": 0}
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._replay: zmq.Socket | None = None
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._closing = False
        try:
            self._pub.set_hwm(hwm)
            self._pub.linger = 0
            if keys is not None:
                keys.server_socket(self._pub, "events")
            self.endpoint = self._bind(self._pub, endpoint)
            self.replay_endpoint: str | None = None
            if replay_endpoint is not None:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.linger = 0
                if keys is not None:
                    keys.server_socket(self._replay, "events")
                self.replay_endpoint = self._bind(self._replay, replay_endpoint)
        except BaseException:
            self._close_sockets()
            raise
        self._thread = threading.Thread(target=self._run, name="kv-events-pub", daemon=True)
        self._started = False

    @staticmethod
    def _bind(sock: zmq.Socket, endpoint: str) -> str:
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as e:
            raise ValueError(f"KV-event publisher cannot bind {endpoint!r}: {e}") from None
        return sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def start(self) -> "EventPublisher":
        """Start sending; seq 0 is ``[AllBlocksCleared, <snapshot>]`` (a new epoch)."""
        if self._started:
            return self
        self._started = True
        self._thread.start()
        with self._state_lock:
            self.publish([AllBlocksCleared(), *(self._snapshot() if self._snapshot else [])])
        return self

    # -- the data path -------------------------------------------------------------------------------

    def publish(self, events: list[Event]) -> int | None:
        """Queue one batch; its seq, or None if the queue was full (the batch is dropped, its seq too)."""
        if not events:
            return None
        with self._lock:
            if self._closing:
                return None
            seq = self._next_seq
            self._next_seq += 1
            self.counters["batches_published"] += 1
            if len(self._queue) >= self._max_queue:
                self.counters["batches_dropped"] += 1
                self.counters["events_dropped"] += len(events)
                return None
            self._queue.append((seq, events))
        os.eventfd_write(self._wake, 1)
        return seq

    @property
    def last_seq(self) -> int:
        """The seq of the latest batch numbered so far (-1 before `start`)."""
        with self._lock:
            return self._next_seq - 1

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self.counters, "queue_depth": len(self._queue), "last_seq": self._next_seq - 1}

    def close(self, drain_timeout: float = 1.0) -> None:
        """Send what is queued (at most ``drain_timeout`` s), then close both sockets."""
        with self._lock:
            self._closing = True
        os.eventfd_write(self._wake, 1)
        if self._thread.is_alive():
            self._thread.join(drain_timeout + 1.0)
        if not self._thread.is_alive():
            self._close_sockets()

    def _close_sockets(self) -> None:
        for s in (self._pub, self._replay):
            if s is not None:
                s.close(linger=0)
        release_zap(self._ctx)  # with keys a ZAP thread holds sockets in this context (kvrelay.security.curve)
        self._ctx.term()
        if self._wake >= 0:
            os.close(self._wake)
            self._wake = -1

    # -- the sender thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wake, zmq.POLLIN)
        if self._replay is not None:
            poller.register(self._replay, zmq.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self._wake in ready:
                try:
                    os.eventfd_read(self._wake)
                except BlockingIOError:
                    pass
            self._send_queued()
            if self._replay is not None and self._replay in ready:
                self._serve_replay()
            with self._lock:
                if self._closing and not self._queue:
                    return

    def _send_queued(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    return
                seq, events = self._queue.popleft()
            payload = encode_batch(make_batch(events, self.dp_rank))
            self._send_live(seq, payload)
            self._buffer.append((seq, payload))
            self.counters["batches_sent"] += 1

    def _send_live(self, seq: int, payload: bytes) -> None:
        try:
            self._pub.send_multipart((self._topic_b, encode_seq(seq), payload), flags=zmq.NOBLOCK)
        except zmq.Again:  # PUB drops at its high-water mark rather than block; still kept for replay
            pass

    def _serve_replay(self) -> None:
        assert self._replay is not None
        while True:
            try:
                frames = self._replay.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != 8:
                self.counters["bad_replay_requests"] += 1
                log.warning("KV-event replay: ignored a request of %d frames (expected [id, '', 8-byte seq])",
                            len(frames))
                continue
            client, _, start = frames
            if start == SNAPSHOT_SEQ:
                self.counters["snapshot_requests"] += 1
                if self._snapshot is not None:
                    with self._state_lock:
                        seq = self.last_seq
                        events: list[Event] = [AllBlocksCleared(), *self._snapshot()]
                    payload = encode_batch(make_batch(events, self.dp_rank))
                    self._replay.send_multipart((client, b"", self._topic_b, encode_seq(seq), payload))
            else:
                self.counters["replay_requests"] += 1
                first = int.from_bytes(start, "big")
                for seq, payload in list(self._buffer):
                    if seq >= first:
                        self._replay.send_multipart((client, b"", self._topic_b, encode_seq(seq), payload))
            self._replay.send_multipart((client, b"", b"", END_SEQ, b""))
