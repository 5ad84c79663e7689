"""Worker pools for the router: health, circuit breakers, load and pairing policies.

Owns: the list of prefill and decode workers, each with its circuit breaker (breaker.py: opened by
consecutive failed requests, at once by a dead process or a failed health check) and in-flight count; the
health probes (GET /healthz, or /health for workers that have only that, such as vLLM's OpenAI server),
which also half-open a worker whose breaker is open; and choosing a worker among those in service (round
robin or least loaded).  Must not touch: HTTP forwarding (legs.py) or when to probe (server.py).
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

POLICIES = ("round_robin", "least_loaded", "cache_aware")  # cache_aware: policy.py; retries pick least loaded


@dataclass
class Worker:
    url: str
    role: str
    breaker: Breaker
    in_flight: int = 0
    load_tokens: int = 0  # prompt tokens of the requests routed to it and not finished (policy.py's load)
    health_path: str = "/healthz"  # "/health" once /healthz answered 404 (vLLM)
    checked_at: float = field(default_factory=time.monotonic)

    @property
    def healthy(self) -> bool:
        """In service: its breaker is not open."""
        return self.breaker.available

    @property
    def last_error(self) -> str:
        return self.breaker.last_error


class NoWorkerError(RuntimeError):
    """No worker of a role is in service."""


class Pool:
    def __init__(self, role: str, urls: list[str], policy: str = "least_loaded", breaker_failures: int = 10) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown pairing policy {policy!r}; choose one of {', '.join(POLICIES)}")
        if breaker_failures < 1:
            raise ValueError(f"--breaker-failures {breaker_failures}: a worker needs at least 1 failure to go out "
                             f"of service")
        self.role = role
        self.on_open: Callable[[], None] = lambda: None  # the router wakes its prober
        self.workers = [Worker(u.rstrip("/"), role, Breaker(f"{role} worker {u.rstrip('/')}", breaker_failures,
                                                             on_open=self._opened)) for u in urls]
        self.policy = policy
        self._rr = itertools.count()

    def _opened(self) -> None:
        self.on_open()

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
                else:
                    w.breaker.probe_failed(f"{w.health_path} answered {status}")
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                w.breaker.probe_failed(f"{w.health_path} failed: {type(exc).__name__}: {exc}")
            w.checked_at = time.monotonic()
        await asyncio.gather(*(one(w) for w in (self.down() if only_down else self.workers)))


async def _get_status(session: aiohttp.ClientSession, url: str, timeout: float) -> int:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        return r.status
