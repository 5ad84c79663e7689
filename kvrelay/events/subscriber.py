"""`EventSubscriber`: follows one KV-event publisher (kvrelay's or vLLM's) and keeps its consumer in step.

    sub = EventSubscriber("tcp://127.0.0.1:5557", "tcp://127.0.0.1:5558", on_batch, on_resync=on_resync)
    sub.start() ... sub.close()

``on_batch(source, seq, batch)`` is called on the subscriber's thread for every batch, in seq order,
exactly once per seq (keep it short: it holds up the next batch).  ``source`` names the publisher
(``source=`` or the endpoint) so one consumer can follow many.  ``on_resync(source)`` is called before
the consumer is handed a fresh full view of that source: drop everything known about it, then apply the
batches that follow (a snapshot batch starts with ``AllBlocksCleared``, as does every publisher's seq 0).

Keeping in step (protocol: `kvrelay.events.wire`):
- **Gap** (a seq above the expected one): replay from the expected seq on the replay socket; if the
  publisher no longer buffers it (or dropped it), ask for a snapshot.
- **(Re)connection**, including a publisher restarted on the same address (a new epoch): resync: a
  snapshot if the publisher serves one (kvrelay's do), else replay from seq 0 (vLLM's buffer).
- **Unrecoverable** (no replay socket, or a publisher without snapshots that lost the seqs): resync and
  carry on from the live seq; counted in ``unrecoverable_gaps``, the view holds only what follows.
- A seq below the expected one on a connection already in step is a duplicate (from a replay): dropped.
- **Catch-up**: ``CATCH_UP_DELAY`` after each resync, one replay from the expected seq collects what the
  publisher sent before it knew of this subscription (ZeroMQ's slow joiner).
Every wait has a deadline (``replay_timeout``); a failed resync is retried with backoff.

Owns: the SUB, DEALER (replay) and monitor sockets and the thread that reads them.  Must not touch: what
the consumer does with the events.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from kvrelay.events.wire import SNAPSHOT_SEQ, END_SEQ, KVEventBatch, WireError, decode_batch, decode_frames, \
    decode_seq, encode_seq
from kvrelay.security.config import current
from kvrelay.security.keyfiles import Keys

log = logging.getLogger(__name__)

CATCH_UP_DELAY = 0.5  # s after a resync: by then the subscription has reached the publisher
OnBatch = Callable[[str, int, KVEventBatch], None]
OnResync = Callable[[str], None]


class _ReplayFailed(Exception):
    pass


class EventSubscriber:
    def __init__(self, endpoint: str, replay_endpoint: str | None, on_batch: OnBatch, topic: str = "", *,
                 on_resync: OnResync | None = None, source: str | None = None, replay_timeout: float = 2.0,
                 keys: Keys | None = None) -> None:
        if replay_timeout <= 0:
            raise ValueError(f"replay_timeout must be positive, got {replay_timeout}")
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic
        self.source = source or endpoint
        self._on_batch = on_batch
        self._on_resync = on_resync
        self._timeout = replay_timeout
        self._keys = keys or current()
        self.expected: int | None = None  # next seq to apply; None: not in step (take the next one seen)
        self._in_step = threading.Event()
        self._closing = False
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ctx = zmq.Context()
        self._dealer: zmq.Socket | None = None
        self._connected_once = False
        self._catch_up_at: float | None = None  # when to replay what a new subscription may have missed
        self.counters = {"batches": 0, "gaps": 0, "replayed": 0, "snapshots": 0, "resyncs": 0, "duplicates": 0,
                         "unrecoverable_gaps": 0, "decode_errors": 0, "callback_errors": 0, "reconnects": 0}
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.linger = 0
        if self._keys is not None and not endpoint.startswith("ipc://"):  # a unix socket: vLLM's has no CURVE
            self._keys.client_socket(self._sub)
        self._sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._monitor = self._sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self._thread = threading.Thread(target=self._run, name=f"kv-events-sub {self.source}", daemon=True)

    # -- the owner's side ----------------------------------------------------------------------------

    def start(self) -> "EventSubscriber":
        try:
            self._sub.connect(self.endpoint)
        except zmq.ZMQError as e:
            raise ValueError(f"KV-event subscriber cannot connect to {self.endpoint!r}: {e}") from None
        self._thread.start()
        return self

    def wait_in_step(self, timeout: float) -> bool:
        """True once the subscriber holds a full view (after its first resync), False after ``timeout`` s."""
        return self._in_step.wait(timeout)

    def stats(self) -> dict[str, int]:
        return {**self.counters, "expected_seq": -1 if self.expected is None else self.expected}

    def close(self) -> None:
        if self._wake < 0:
            return  # closed already
        self._closing = True
        if self._wake >= 0:
            os.eventfd_write(self._wake, 1)
        if self._thread.is_alive():
            self._thread.join(self._timeout + 2.0)
        if self._thread.is_alive():
            log.warning("KV-event subscriber %s: thread did not stop; sockets left to the process exit",
                        self.source)
            return
        self._sub.disable_monitor()
        for s in (self._monitor, self._sub, self._dealer):
            if s is not None:
                s.close(linger=0)
        self._ctx.term()
        os.close(self._wake)
        self._wake = -1

    # -- the thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        for s in (self._sub, self._monitor, self._wake):
            poller.register(s, zmq.POLLIN)
        need_resync = False
        backoff = 0.1
        while not self._closing:
            timeout: float | None = backoff if need_resync else None
            if self._catch_up_at is not None:
                timeout = max(0.0, min(timeout or CATCH_UP_DELAY, self._catch_up_at - time.monotonic()))
            ready = dict(poller.poll(None if timeout is None else int(timeout * 1000)))
            if self._closing:
                return
            if self._monitor in ready:
                need_resync |= self._read_monitor()
            if need_resync:
                if self._resync():
                    need_resync, backoff = False, 0.1
                else:
                    backoff = min(backoff * 2, 2.0)
                    self._drain_sub()  # not in step: what arrives now is covered by the next resync
                    continue
            if self._sub in ready:
                need_resync = self._read_sub()
            if not need_resync and self._catch_up_at is not None and time.monotonic() >= self._catch_up_at:
                need_resync = not self._catch_up()

    def _read_monitor(self) -> bool:
        """True when a (re)connection calls for a resync."""
        resync = False
        while True:
            try:
                msg = recv_monitor_message(self._monitor, flags=zmq.NOBLOCK)
            except zmq.Again:
                return resync
            if msg["event"] == zmq.EVENT_CONNECTED:
                resync = True
                self.counters["reconnects"] += self._connected_once
                self._connected_once = True
            elif msg["event"] == zmq.EVENT_DISCONNECTED:
                self._in_step.clear()

    def _drain_sub(self) -> None:
        while True:
            try:
                self._sub.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return

    def _read_sub(self) -> bool:
        """Apply what the SUB socket holds; True if a resync is needed and could not be done."""
        while not self._closing:
            try:
                frames = self._sub.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return False
            try:
                _, seq, batch = decode_frames(frames)
            except WireError as e:
                self.counters["decode_errors"] += 1
                log.warning("KV-event subscriber %s: dropped a message: %s", self.source, e)
                continue
            if self.expected is None and self.replay_endpoint is not None and not self._resync():
                return True
            if self.expected is None:  # no replay socket, or a publisher whose buffer was empty
                if self.replay_endpoint is None:
                    self._resynced()
                self.expected = seq
            if seq < self.expected:
                self.counters["duplicates"] += 1
                continue
            if seq > self.expected:
                self.counters["gaps"] += 1
                if not self._recover(seq):
                    return True
                if seq < self.expected:
                    continue
            self._apply(seq, batch)
        return False

    def _apply(self, seq: int, batch: KVEventBatch) -> None:
        self.expected = seq + 1
        self.counters["batches"] += 1
        try:
            self._on_batch(self.source, seq, batch)
        except Exception:
            self.counters["callback_errors"] += 1
            log.exception("KV-event subscriber %s: on_batch failed on seq %d", self.source, seq)

    def _resynced(self) -> None:
        self.counters["resyncs"] += 1
        self._catch_up_at = time.monotonic() + CATCH_UP_DELAY
        if self._on_resync is not None:
            try:
                self._on_resync(self.source)
            except Exception:
                self.counters["callback_errors"] += 1
                log.exception("KV-event subscriber %s: on_resync failed", self.source)
        self._in_step.set()

    # -- recovery ------------------------------------------------------------------------------------

    def _recover(self, live_seq: int) -> bool:
        """Fill the hole below ``live_seq`` (replay, else snapshot, else give up on it); False: retry later."""
        assert self.expected is not None
        if self.replay_endpoint is None:
            return self._give_up(live_seq)
        try:
            for seq, batch in self._request(encode_seq(self.expected)):
                if seq == self.expected:
                    self.counters["replayed"] += 1
                    self._apply(seq, batch)
            if self.expected >= live_seq:
                return True
            return self._resync(live_seq)
        except _ReplayFailed as e:
            log.warning("KV-event subscriber %s: replay from %d failed: %s", self.source, self.expected, e)
            self.expected = None
            self._in_step.clear()
            return False

    def _resync(self, live_seq: int | None = None) -> bool:
        """A full view: a snapshot, else replay from 0, else (no replay socket) the next seq; False: retry."""
        if self.replay_endpoint is None:
            self._resynced()
            self.expected = None
            return True
        try:
            snap = self._request(SNAPSHOT_SEQ)
            if snap:
                seq, batch = snap[0]
                self.counters["snapshots"] += 1
                self._resynced()
                self._apply(seq, batch)
                return True
            replayed = self._request(encode_seq(0))  # a publisher without snapshots (vLLM): its buffer
        except _ReplayFailed as e:
            log.warning("KV-event subscriber %s: resync failed (will retry): %s", self.source, e)
            self.expected = None
            self._in_step.clear()
            return False
        self._resynced()
        self.expected = None
        for seq, batch in replayed:
            if self.expected is None:
                if seq != 0:
                    self.counters["unrecoverable_gaps"] += 1
                self.expected = seq
            if seq == self.expected:
                self.counters["replayed"] += 1
                self._apply(seq, batch)
        if live_seq is not None and (self.expected is None or self.expected < live_seq):
            return self._give_up(live_seq)
        return True

    def _catch_up(self) -> bool:
        """Replay what was published while this subscription was still reaching the publisher (ZeroMQ's
        slow joiner: a PUB drops what it sends before it knows of the SUB); False: resync later."""
        self._catch_up_at = None
        if self.expected is None or self.replay_endpoint is None:
            return True
        try:
            batches = self._request(encode_seq(self.expected))
        except _ReplayFailed as e:
            log.warning("KV-event subscriber %s: catch-up replay failed: %s", self.source, e)
            self.expected = None
            self._in_step.clear()
            return False
        for seq, batch in batches:
            if seq > self.expected:  # the publisher no longer has (or never sent) the seqs in between
                return self._resync()
            if seq == self.expected:
                self.counters["replayed"] += 1
                self._apply(seq, batch)
        return True

    def _give_up(self, live_seq: int) -> bool:
        self.counters["unrecoverable_gaps"] += 1
        log.warning("KV-event subscriber %s: seqs %s..%d are lost; resyncing to what follows", self.source,
                    self.expected, live_seq - 1)
        self._resynced()
        self.expected = live_seq
        return True

    def _request(self, start: bytes) -> list[tuple[int, KVEventBatch]]:
        """One replay request: the batches answered before the end marker, within ``replay_timeout``."""
        assert self.replay_endpoint is not None
        if self._dealer is None:
            self._dealer = self._ctx.socket(zmq.DEALER)
            self._dealer.linger = 0
            if self._keys is not None and not self.replay_endpoint.startswith("ipc://"):
                self._keys.client_socket(self._dealer)
            self._dealer.connect(self.replay_endpoint)
        deadline = time.monotonic() + self._timeout
        out: list[tuple[int, KVEventBatch]] = []
        try:
            self._dealer.send_multipart((b"", start), flags=zmq.NOBLOCK)
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not self._dealer.poll(int(left * 1000) + 1):
                    raise _ReplayFailed(f"no end of replay from {self.replay_endpoint} within {self._timeout} s")
                frames = self._dealer.recv_multipart()
                if len(frames) != 4 or frames[0] != b"":
                    raise _ReplayFailed(f"replay answer of {len(frames)} frames, expected 4")
                if frames[2] == END_SEQ:
                    return out
                try:
                    out.append((decode_seq(frames[2]), decode_batch(frames[3])))
                except WireError as e:
                    self.counters["decode_errors"] += 1
                    raise _ReplayFailed(str(e)) from None
        except (_ReplayFailed, zmq.ZMQError):
            self._dealer.close(linger=0)  # answers still in flight must not be read as the next request's
            self._dealer = None
            raise
