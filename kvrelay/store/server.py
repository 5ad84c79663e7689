"""The daemon's control loop: a ZMQ ROUTER on 127.0.0.1, and a Unix socket for same-host clients
(local.py), that answers every request exactly once.

Owns: sessions (one per client socket), waiters (pulls and wait_ready parked until their chunk is
committed or their deadline passes, woken by the commit, never by polling), dispatch and error replies.
Must not touch: storage rules (core.py) or chunk bytes.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import time
import traceback
import uuid
from dataclasses import dataclass

import zmq

from kvrelay import security
from kvrelay.security.curve import release as release_zap
from kvrelay.keys import kid_of
from kvrelay.store import protocol as P
from kvrelay.store.core import StoreCore
from kvrelay.store.errors import OpError, StoreCode
from kvrelay.store.local import LocalListener, local_name
from kvrelay.store.metrics import StoreMetrics
from kvrelay.store.purge import peer_identity, purge
from kvrelay.store.requestchunks import RequestChunks

log = logging.getLogger("kvrelay.store")
SWEEP_INTERVAL = 0.25  # housekeeping (expiry) period and the longest the loop sleeps
MAX_TOUCHED = 4096  # directory pulls reported per request (a client sends them in batches of TOUCH_BATCH)
ABORT_TTL = 120.0  # an aborted request id fails new pulls this long
MAX_SESSIONS = 65536


@dataclass(eq=False)
class Waiter:
    ident: bytes
    req: P.Pull | P.PullMany | P.WaitReady
    deadline: float
    start: float
    done: bool = False
    kid: str = ""  # the key it is parked on


def _keys_of(req: P.Pull | P.PullMany | P.WaitReady) -> list:
    return [req.key] if isinstance(req, P.Pull) else list(req.keys)


class StoreServer:
    def __init__(self, core: StoreCore, metrics: StoreMetrics, host: str, port: int,
                 endpoints: dict[str, dict] | None = None, local: bool = True) -> None:
        self.core = core
        self.metrics = metrics
        # fault injection (kvrelay bench faults): every request but Hello/Ping waits this long first
        self.fault_delay = float(os.environ.get("KVRELAY_FAULT_STORE_DELAY_MS", "0") or 0) / 1000
        if self.fault_delay:
            log.warning("fault injection: KVRELAY_FAULT_STORE_DELAY_MS delays every request by %.0f ms",
                        self.fault_delay * 1000)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.keys = security.current()
        if self.keys is not None:  # CURVE: only holders of the cluster's client key get in (kvrelay.security)
            self.keys.server_socket(self.sock, "store")
        if port == 0:
            self.port = self.sock.bind_to_random_port(f"tcp://{host}")
        else:
            self.sock.bind(f"tcp://{host}:{port}")
            self.port = port
        self.address = f"tcp://{host}:{self.port}"
        self.endpoints = endpoints or {}
        self.sessions: dict[bytes, P.Hello] = {}
        self.waiters: dict[str, list[Waiter]] = {}
        self.deadlines: list[tuple[float, int, Waiter]] = []
        self._seq = itertools.count()
        self.aborted: dict[str, tuple[str, float]] = {}  # request id -> (reason, expiry)
        self.request_chunks = RequestChunks()  # request id -> what its publisher reserved (a pull fails at once
        self.rid_waiters: dict[str, list[Waiter]] = {}  # when none of its chunks is among them: MISMATCH)
        self.epoch = uuid.uuid4().hex[:16]  # a restarted daemon is a new store: clients re-handshake
        self.running = True
        self.local: LocalListener | None = None  # same-host clients' Unix socket (local.py)
        if local:
            try:
                self.local = LocalListener(local_name(self.port, core.pool.name), same_user=self.keys is not None)
            except OSError as exc:  # another process holds the name: ZMQ still serves everyone
                log.warning("no same-host control socket (%s): clients use the ZMQ socket only", exc)
        self._poller = zmq.Poller()

    # --- loop --------------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        poller = self._poller
        poller.register(self.sock, zmq.POLLIN)
        local = self.local
        if local is not None:
            poller.register(local.fd, zmq.POLLIN)
        promoter = self.core.promoter
        if promoter is not None:  # SSD read-backs finishing wake their waiters
            poller.register(promoter.fd, zmq.POLLIN)
        next_sweep = time.monotonic() + SWEEP_INTERVAL
        while self.running:
            now = time.monotonic()
            wait = min(next_sweep, self.deadlines[0][0] if self.deadlines else next_sweep) - now
            events = dict(poller.poll(max(0, int(wait * 1000) + 1)))
            if promoter is not None and promoter.fd in events:
                for kid, err in promoter.drain():
                    self._promoted(kid, err)
            if self.sock in events:
                for _ in range(256):  # drain a burst without re-polling
                    try:
                        frames = self.sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_message(frames)
            if local is not None:
                for fd, ev in events.items():
                    if fd == local.fd:
                        for c in local.accept():
                            poller.register(c, zmq.POLLIN)
                    elif isinstance(fd, int) and fd in local.conns:
                        self._on_local(local, fd, ev)
            now = time.monotonic()
            self.metrics.heartbeat = now
            if self.core.ix.directory is not None:
                self.core.ix.directory.beat()
            self._expire_waiters(now)
            if now >= next_sweep:
                self.core.sweep()
                for rid in [r for r, (_, exp) in self.aborted.items() if exp <= now]:
                    del self.aborted[rid]
                self.request_chunks.sweep(now)
                for rid in [r for r, ws in self.rid_waiters.items() if all(w.done for w in ws)]:
                    del self.rid_waiters[rid]
                next_sweep = now + SWEEP_INTERVAL
        self.sock.close()
        release_zap(self.ctx)
        self.ctx.term()
        if local is not None:
            local.close()

    def _on_local(self, local: LocalListener, fd: int, ev: int) -> None:
        if ev & zmq.POLLOUT and local.flush(fd) is None:
            self._poller.modify(fd, zmq.POLLIN)
        if ev & (zmq.POLLIN | zmq.POLLERR):
            ident, msgs, why = local.read(fd)
            for m in msgs:
                self._on_frame(ident, m)
            if why is not None:
                log.debug("local control connection %s: %s", ident.hex(), why)
                self.sessions.pop(ident, None)
                self._poller.unregister(fd)
                local.close_conn(fd)

    def _send(self, ident: bytes, reply: P.Reply) -> None:
        if not reply.ok:
            self.core.counters["bad_requests"] += 1
        if self.local is not None and ident in self.local.by_ident:
            fd = self.local.send(ident, P.encode(reply))
            if fd is not None:  # the rest goes when the socket can take it
                self._poller.modify(fd, zmq.POLLIN | zmq.POLLOUT)
            return
        try:
            self.sock.send_multipart([ident, P.encode(reply)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the client went away; nothing else to do
            log.debug("reply to a gone client dropped: %s", exc)

    def _on_message(self, frames: list[bytes]) -> None:
        ident = frames[0]
        if len(frames) != 2:
            self._send(ident, P.Reply(req_id=-1, ok=False, code=StoreCode.BAD_REQUEST,
                                      error=f"expected one message frame, got {len(frames) - 1}"))
            return
        self._on_frame(ident, frames[1])

    def _on_frame(self, ident: bytes, frame: bytes) -> None:
        self.core.last_activity = self.core.clock.monotonic()  # the spiller writes when this has been quiet a while
        try:
            req = P.decode_request(frame)
        except P.BadRequest as exc:
            self._send(ident, P.Reply(req_id=-1, ok=False, code=exc.code, error=str(exc)))
            return
        try:
            if req.unpin and ident in self.sessions:  # pins of a previous daemon's epoch mean nothing here
                self.core.unpin(req.unpin)
            if req.touched and ident in self.sessions:
                self.core.touched(req.touched[:MAX_TOUCHED])
            if self.fault_delay and not isinstance(req, (P.Hello, P.Ping)):
                time.sleep(self.fault_delay)
            reply = self._dispatch(ident, req)
        except OpError as exc:
            reply = P.Reply(req_id=req.req_id, ok=False, code=exc.code, error=str(exc))
        except Exception as exc:  # a bug: answer, log, keep serving
            log.error("internal error on %s: %s", type(req).__name__, traceback.format_exc())
            reply = P.Reply(req_id=req.req_id, ok=False, code=StoreCode.INTERNAL,
                            error=f"{type(exc).__name__}: {exc}")
        if reply is not None:
            self._send(ident, reply)

    # --- requests ----------------------------------------------------------------------------------
    def _dispatch(self, ident: bytes, req: P.Request) -> P.Reply | None:
        core = self.core
        if isinstance(req, P.Hello):
            if req.transport != "shm" and req.transport not in self.endpoints:
                raise OpError(StoreCode.BAD_REQUEST, f"transport {req.transport!r} is not served by this store; it "
                                                     f"serves {['shm', *self.endpoints]}: start it with --transports")
            self.sessions.pop(ident, None)
            self.sessions[ident] = req
            if len(self.sessions) > MAX_SESSIONS:  # forget the longest-idle client socket's hello
                del self.sessions[next(iter(self.sessions))]
            return P.Reply(req_id=req.req_id, info={"pool_name": core.pool.name, "pool_bytes": core.pool.nbytes,
                                                    "endpoints": self.endpoints, "protocol": P.PROTOCOL_VERSION,
                                                    "epoch": self.epoch,
                                                    "local": self.local.name if self.local else "",
                                                    "directory": self._directory_info()})
        if ident not in self.sessions:
            if isinstance(req, (P.Ping, P.Stats)):
                return self._dispatch_anonymous(req)
            raise OpError(StoreCode.SESSION, "this client has not said hello to this store (did the store restart?); "
                                             "send hello first: StoreClient does so and retries by itself")
        ns = self.sessions[ident].compat_hash
        if isinstance(req, P.Lookup):
            return P.Reply(req_id=req.req_id, count=core.lookup(req.keys, tenant=req.tenant))
        if isinstance(req, P.Reserve):
            slots = core.reserve(req.request_id, req.keys, req.nbytes, req.ttl, ns, req.tenant, req.tokens)
            self.request_chunks.reserved(req.request_id, req.keys, time.monotonic())
            if req.request_id in self.rid_waiters:
                self._fail_mismatched(req.request_id)
            return P.Reply(req_id=req.req_id, slots=slots)
        if isinstance(req, (P.Commit, P.CommitMany)):
            return self._commit(ident, req, ns)
        if isinstance(req, (P.Pull, P.PullMany, P.WaitReady)):
            now = time.monotonic()
            w = Waiter(ident, req, now + max(0.0, req.timeout), now)
            if req.request_id in self.aborted:  # what is ready is served (as through the directory); no waiting
                return self._ready_reply(w)[0] or self._aborted_reply(req)
            return self._try_waiter(w, park=True)
        if isinstance(req, P.Abort):
            return P.Reply(req_id=req.req_id, count=self._abort(req.request_id, req.reason))
        if isinstance(req, P.Lease):
            return P.Reply(req_id=req.req_id, count=len(core.lease(req.keys, req.ttl)))
        if isinstance(req, P.Release):
            return P.Reply(req_id=req.req_id, count=core.release(req.request_id, req.keys))
        if isinstance(req, P.Delete):
            return P.Reply(req_id=req.req_id, count=core.delete(req.keys))
        if isinstance(req, P.Purge):
            return purge(core, req, client=self.sessions[ident].name, peer=peer_identity(self.local, ident))
        if isinstance(req, (P.Stats, P.Ping)):
            return self._dispatch_anonymous(req)
        raise OpError(StoreCode.BAD_REQUEST, f"unhandled request {type(req).__name__}")

    def _commit(self, ident: bytes, req: P.Commit | P.CommitMany, ns: str) -> P.Reply:
        """Commit and CommitMany alike (a Commit is a batch of one whose refusal is the reply's error)."""
        mode = self.core.cfg.verify_commits
        verify = mode == "all" or (mode == "remote" and self.sessions[ident].transport != "shm")
        single = isinstance(req, P.Commit)
        if isinstance(req, P.Commit):
            keys, headers = [req.key], [req.header]
        else:
            keys, headers = req.keys, req.headers
        if len(keys) != len(headers):
            raise OpError(StoreCode.BAD_REQUEST, f"commit_many: {len(keys)} keys but {len(headers)} headers")
        fresh, refused = self.core.commit_many(keys, headers, ns, verify)  # one refusal undoes no other
        if self.waiters:
            for kid in fresh:
                self._wake(kid)
        if refused and single:
            raise refused[0]
        if refused:
            more = f" ({len(refused)} of {len(keys)} refused; the rest committed)" if len(keys) > 1 else ""
            return P.Reply(req_id=req.req_id, ok=False, code=refused[0].code, error=f"{refused[0]}{more}",
                           count=len(fresh))
        return P.Reply(req_id=req.req_id, count=len(fresh))

    def _directory_info(self) -> dict:
        d = self.core.ix.directory
        return {"name": d.name, "slots": d.slots} if d is not None else {}

    def _dispatch_anonymous(self, req: P.Ping | P.Stats) -> P.Reply:
        if isinstance(req, P.Stats):
            return P.Reply(req_id=req.req_id, info={**self.core.stats(), "waiters": sum(map(len, self.waiters.values()))})
        return P.Reply(req_id=req.req_id)

    def _ready_reply(self, w: Waiter) -> tuple[P.Reply | None, str]:
        """(the answer, "") if the waiter's chunk(s) are ready, else (None, the first missing chunk id)."""
        req = w.req
        if isinstance(req, P.Pull):
            got = self.core.acquire(req.key)  # may raise OpError (corrupt on SSD, no room)
            if got is not None:
                self.metrics.pull_latency.observe(time.monotonic() - w.start)
                slot, header = got
                return P.Reply(req_id=req.req_id, slots=[slot], header=header), ""
            return None, kid_of(req.key)
        if isinstance(req, P.PullMany):
            if not req.keys:
                return P.Reply(req_id=req.req_id), ""
            many = self.core.acquire_many(req.keys, self.core.capacity)  # may raise OpError
            if not isinstance(many, int):
                self.metrics.pull_latency.observe(time.monotonic() - w.start)
                return P.Reply(req_id=req.req_id, slots=many[0], headers=many[1], count=len(many[0])), ""
            return None, kid_of(req.keys[many])
        n = self.core.lookup(req.keys, record=False)
        if n == len(req.keys):
            return P.Reply(req_id=req.req_id, count=n), ""
        return None, kid_of(req.keys[n])

    def _try_waiter(self, w: Waiter, park: bool) -> P.Reply | None:
        """Answer the waiter if its chunk(s) are ready; else park it on the first missing key."""
        reply, missing = self._ready_reply(w)
        if reply is not None:
            return reply
        now = time.monotonic()
        if now >= w.deadline:
            return self._timeout_reply(w, missing)
        rid = w.req.request_id
        if park and rid:
            why = self.request_chunks.mismatch(rid, _keys_of(w.req), now)
            if why is not None:
                return self._mismatch_reply(w, why)
            self.rid_waiters.setdefault(rid, []).append(w)
        w.kid = missing
        self.waiters.setdefault(missing, []).append(w)
        if park:
            heapq.heappush(self.deadlines, (w.deadline, next(self._seq), w))
        return None

    def _fail_mismatched(self, rid: str) -> None:
        """``rid``'s publisher just reserved: its parked pulls that wait for none of its chunks fail now."""
        now, keep = time.monotonic(), []
        for w in self.rid_waiters.pop(rid, []):
            if w.done:
                continue
            why = self.request_chunks.mismatch(rid, _keys_of(w.req), now)
            if why is None:
                keep.append(w)
                continue
            self._send(w.ident, self._mismatch_reply(w, why))
            parked = self.waiters.get(w.kid)
            if parked is not None and w in parked:
                parked.remove(w)
                if not parked:
                    del self.waiters[w.kid]
        if keep:
            self.rid_waiters[rid] = keep

    def _mismatch_reply(self, w: Waiter, why: str) -> P.Reply:
        w.done = True
        self.core.counters["mismatches"] += 1
        return P.Reply(req_id=w.req.req_id, ok=False, code=StoreCode.MISMATCH, error=why)

    def _abort(self, rid: str, reason: str) -> int:
        if not rid:
            raise OpError(StoreCode.BAD_REQUEST, "abort needs a request_id")
        self.aborted[rid] = (reason or "no reason given", time.monotonic() + ABORT_TTL)
        self.core.counters["aborts"] += 1
        n = 0
        for kid in list(self.waiters):
            keep = []
            for w in self.waiters[kid]:
                if not w.done and w.req.request_id == rid:
                    w.done = True
                    self._send(w.ident, self._aborted_reply(w.req))
                    n += 1
                elif not w.done:
                    keep.append(w)
            if keep:
                self.waiters[kid] = keep
            else:
                del self.waiters[kid]
        return n

    def _aborted_reply(self, req: P.Pull | P.PullMany | P.WaitReady) -> P.Reply:
        return P.Reply(req_id=req.req_id, ok=False, code=StoreCode.ABORTED,
                       error=f"request {req.request_id} was aborted by its publisher: {self.aborted[req.request_id][0]}")

    def _timeout_reply(self, w: Waiter, kid: str) -> P.Reply:
        w.done = True
        return P.Reply(req_id=w.req.req_id, ok=False, code=StoreCode.TIMEOUT,
                       error=f"chunk {kid} was not ready within {w.req.timeout:.3f}s ({self._why_missing(kid)})")

    def _why_missing(self, kid: str) -> str:
        """What the store knows of a chunk a pull waited for in vain: reserved and not committed (the publisher
        is slow, stuck or gone), or never reserved (no publisher came; it may publish under other keys)."""
        e = self.core.ix.get(kid)
        if e is None:
            return "no publisher reserved it: the prefill never began publishing it, or publishes other keys"
        if e.ready:
            return "it is ready now: it was committed as the wait ended"
        return (f"reserved by request {e.request_id!r}, never committed: the publisher is slow, stuck or gone "
                f"(its reservation expires in {max(0.0, e.deadline - self.core.clock.monotonic()):.0f}s)")

    def _wake(self, kid: str) -> None:
        for w in self.waiters.pop(kid, []):
            if w.done:
                continue
            try:
                reply = self._try_waiter(w, park=False)
            except OpError as exc:
                reply = P.Reply(req_id=w.req.req_id, ok=False, code=exc.code, error=str(exc))
            if reply is not None:
                w.done = True
                self._send(w.ident, reply)

    def _promoted(self, kid: str, err: str | None) -> None:
        if err is None:
            self._wake(kid)
            return
        for w in self.waiters.pop(kid, []):
            if not w.done:
                w.done = True
                self._send(w.ident, P.Reply(req_id=w.req.req_id, ok=False, code=StoreCode.CORRUPT, error=err))

    def _expire_waiters(self, now: float) -> None:
        while self.deadlines and self.deadlines[0][0] <= now:
            _, _, w = heapq.heappop(self.deadlines)
            if w.done:
                continue
            self._send(w.ident, self._timeout_reply(w, w.kid))
            parked = self.waiters.get(w.kid)
            if parked is not None:
                parked.remove(w)
                if not parked:
                    del self.waiters[w.kid]
