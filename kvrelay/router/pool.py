"""Worker pools for the router: health, circuit breakers, load and pairing policies.

Owns: the list of prefill and decode workers, each with its circuit breaker (breaker.py: opened by
consecutive failed requests, at once by a dead process or a failed health check) and its load as the engine
feels it, from what this router sent and has not seen end (exact, no lag): requests in flight, tokens
(a prefill worker: prompt tokens queued and running; a decode worker: the KV tokens its sequences hold) and
sequences (a decode worker: requests it is decoding), counted only here, through `Worker.hold` and the
`Load` it returns, which gives its share back once released (answered, failed or cancelled alike); and,
lagged, the requests other clients hold there, read from the engine's /metrics (engineload.py; --engine-load); the health probes (GET /healthz, or /health for workers that have
only that, such as vLLM's OpenAI server), which also half-open a worker whose breaker is open; and choosing
a worker among those in service (round robin or least loaded).  Must not touch: HTTP forwarding (legs.py)
or when to probe (app.py).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Set
from dataclasses import dataclass, field
from typing import Callable

import aiohttp

from kvrelay.router.breaker import Breaker
from kvrelay.router.engineload import EngineLoad, parse_engine_load

POLICIES = ("round_robin", "least_loaded", "cache_aware")  # cache_aware: policy.py; retries pick least loaded


@dataclass
class Worker:
    url: str
    role: str
    breaker: Breaker
    health_path: str = "/healthz"  # "/health" once /healthz answered 404 (vLLM)
    checked_at: float = field(default_factory=time.monotonic)
    _in_flight: int = field(default=0, init=False)
    _load_tokens: int = field(default=0, init=False)
    _seqs: int = field(default=0, init=False)
    engine: EngineLoad | None = field(default=None, init=False)  # its last /metrics reading
    others: int = field(default=0, init=False)  # requests there that this router did not send (that reading's)
    metrics_path: str = field(default="/metrics", init=False)  # "" once it answered that it has none

    @property
    def healthy(self) -> bool:
        """In service: its breaker is not open."""
        return self.breaker.available

    @property
    def last_error(self) -> str:
        return self.breaker.last_error

    @property
    def in_flight(self) -> int:
        """Requests sent to it and not answered, and prefill legs picked for it and not started yet."""
        return self._in_flight

    @property
    def load_tokens(self) -> int:
        """Tokens of the requests routed to it and not finished (policy.py's load): a prefill worker's prompt
        tokens to compute, a decode worker's KV tokens held."""
        return self._load_tokens

    @property
    def seqs(self) -> int:
        """Sequences routed to it and not finished (a decode worker's running batch, as far as this router sent)."""
        return self._seqs

    @property
    def depth(self) -> int:
        """Requests queued and running there: this router's own (exact) and, from the engine's last /metrics
        reading, those other clients sent (lagged)."""
        return max(self._in_flight, self._seqs) + self.others

    def hold(self, requests: int = 0, tokens: int = 0, seqs: int = 0) -> Load:
        """Count ``requests`` more in flight, ``tokens`` more queued and ``seqs`` more sequences on this worker
        until the returned `Load` is released (``with worker.hold(...):``, or its ``release()``)."""
        if requests < 0 or tokens < 0 or seqs < 0:
            raise ValueError(f"a load is not negative: requests {requests}, tokens {tokens}, seqs {seqs}")
        self._in_flight += requests
        self._load_tokens += tokens
        self._seqs += seqs
        return Load(self, requests, tokens, seqs)


@dataclass(eq=False, slots=True)
class Load:
    """A share of one worker's load (`Worker.hold`); ``release()`` gives it back, once (again: nothing)."""

    worker: Worker
    requests: int
    tokens: int
    seqs: int = 0
    held: bool = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.worker._in_flight -= self.requests
            self.worker._load_tokens -= self.tokens
            self.worker._seqs -= self.seqs

    def __enter__(self) -> Load:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class NoWorkerError(RuntimeError):
    """No worker of a role is in service."""


class Pool:
    def __init__(self, role: str, urls: list[str], policy: str = "least_loaded", breaker_failures: int = 10,
                 read_engine_load: bool = False) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown pairing policy {policy!r}; choose one of {', '.join(POLICIES)}")
        if breaker_failures < 1:
            raise ValueError(f"breaker_failures {breaker_failures}: a worker needs at least 1 failure to go out of "
                             f"service")
        self.role = role
        self.on_open: Callable[[], None] = lambda: None  # the router wakes its prober
        self.workers = [Worker(u.rstrip("/"), role, Breaker(f"{role} worker {u.rstrip('/')}", breaker_failures,
                                                             on_open=self._opened)) for u in urls]
        self.policy, self.breaker_failures = policy, breaker_failures
        self._rr = itertools.count()
        self.read_engine_load = read_engine_load  # each probe also reads the engine's /metrics (--engine-load)

    def _opened(self) -> None:
        self.on_open()

    def add(self, url: str) -> Worker:
        """Put a worker in the pool at run time (membership, kvrelay/router/members.py), in service at once
        (the health loop checks it like the others); the worker already there if ``url`` is."""
        url = url.rstrip("/")
        for w in self.workers:
            if w.url == url:
                return w
        worker = Worker(url, self.role, Breaker(f"{self.role} worker {url}", self.breaker_failures,
                                                on_open=self._opened))
        self.workers = [*self.workers, worker]  # a new list: a loop over the old one (a probe) is not disturbed
        return worker

    def remove(self, url: str) -> bool:
        """Take a worker out of the pool (its lease expired); its requests in flight finish or fail as they
        would.  True if it was there."""
        url = url.rstrip("/")
        kept = [w for w in self.workers if w.url != url]
        removed = len(kept) != len(self.workers)
        self.workers = kept
        return removed

    def healthy(self) -> list[Worker]:
        return [w for w in self.workers if w.healthy]

    def down(self) -> list[Worker]:
        return [w for w in self.workers if not w.healthy]

    def pick(self, exclude: Set[str] = frozenset()) -> Worker:
        candidates = [w for w in self.healthy() if w.url not in exclude]
        if not candidates:
            known = ", ".join(f"{w.url} ({'up' if w.healthy else 'down: ' + w.last_error})" for w in self.workers)
            raise NoWorkerError(f"no healthy {self.role} worker available (workers: {known or 'none configured'})")
        if self.policy == "round_robin":
            return candidates[next(self._rr) % len(candidates)]
        return min(candidates, key=lambda w: (w.in_flight, w.breaker.consecutive))

    def pick_by(self, cost: Callable[[Worker], float]) -> Worker:
        """The worker in service of least ``cost`` (ties: fewest in flight); NoWorkerError if none."""
        if not self.healthy():
            self.pick()  # raises NoWorkerError naming the workers
        return min(self.healthy(), key=lambda w: (cost(w), w.in_flight, w.breaker.consecutive))

    def mark_failed(self, worker: Worker, reason: str, fatal: bool = False) -> bool:
        """A request to ``worker`` failed (``fatal``: its process is gone); True if its breaker opened now."""
        return worker.breaker.failure(reason, fatal)

    def mark_ok(self, worker: Worker) -> None:
        worker.breaker.success()

    async def check(self, session: aiohttp.ClientSession, timeout: float = 2.0, only_down: bool = False) -> None:
        """Probe every worker's health (``only_down``: those out of service)."""
        async def one(w: Worker) -> None:
            try:
                status = await _get_status(session, w.url + w.health_path, timeout)
                if status == 404 and w.health_path == "/healthz":
                    w.health_path = "/health"
                    status = await _get_status(session, w.url + w.health_path, timeout)
                if status == 200:
                    w.breaker.probe_ok()
                    if self.read_engine_load and w.metrics_path:
                        await _read_engine_load(session, w, timeout)
                else:
                    w.breaker.probe_failed(f"{w.health_path} answered {status}")
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                w.breaker.probe_failed(f"{w.health_path} failed: {type(exc).__name__}: {exc}")
            w.checked_at = time.monotonic()
        await asyncio.gather(*(one(w) for w in (self.down() if only_down else self.workers)))


async def _get_status(session: aiohttp.ClientSession, url: str, timeout: float) -> int:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        return r.status


async def _read_engine_load(session: aiohttp.ClientSession, w: Worker, timeout: float) -> None:
    """GET its /metrics: the requests the engine holds beyond this router's own (`Worker.others`).  A worker
    without the page (404) or without the metrics is not asked again; a failed read changes nothing."""
    own = w.depth - w.others
    try:
        async with session.get(w.url + w.metrics_path, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            if r.status == 404:
                w.metrics_path = ""
                return
            if r.status != 200:
                return
            reading = parse_engine_load(await r.text())
    except (aiohttp.ClientError, asyncio.TimeoutError, UnicodeDecodeError, ValueError):
        return  # its health answered: a failed read of its load takes nothing out of service
    if reading is None:
        w.metrics_path = ""
        return
    own = min(own, w.depth - w.others)  # what this router held while the engine counted (the smaller: others
    w.engine, w.others = reading, max(0, reading.requests - own)  # is never overstated by its own requests)
