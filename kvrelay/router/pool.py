"""Worker pools for the router: health, load and pairing policies.

Owns: the list of prefill and decode workers, their health (a periodic GET /healthz, or /health for
workers that have only that, such as vLLM's OpenAI server; plus passive marking when a request to them
fails) and in-flight counts, and choosing a worker (round robin or least
loaded).  Must not touch: HTTP forwarding (server.py).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Set
from dataclasses import dataclass, field

import aiohttp

POLICIES = ("round_robin", "least_loaded")


@dataclass
class Worker:
    url: str
    role: str
    healthy: bool = True
    in_flight: int = 0
    failures: int = 0
    last_error: str = ""
    health_path: str = "/healthz"  # "/health" once /healthz answered 404 (vLLM)
    checked_at: float = field(default_factory=time.monotonic)


class NoWorkerError(RuntimeError):
    """No healthy worker of a role is available."""


class Pool:
    def __init__(self, role: str, urls: list[str], policy: str = "least_loaded") -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown pairing policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.role = role
        self.workers = [Worker(u.rstrip("/"), role) for u in urls]
        self.policy = policy
        self._rr = itertools.count()

    def healthy(self) -> list[Worker]:
        return [w for w in self.workers if w.healthy]

    def pick(self, exclude: Set[str] = frozenset()) -> Worker:
        candidates = [w for w in self.healthy() if w.url not in exclude]
        if not candidates:
            known = ", ".join(f"{w.url} ({'up' if w.healthy else 'down: ' + w.last_error})" for w in self.workers)
            raise NoWorkerError(f"no healthy {self.role} worker available (workers: {known or 'none configured'})")
        if self.policy == "round_robin":
            return candidates[next(self._rr) % len(candidates)]
        return min(candidates, key=lambda w: (w.in_flight, w.failures))

    def mark_failed(self, worker: Worker, reason: str) -> None:
        worker.healthy = False
        worker.failures += 1
        worker.last_error = reason

    async def check(self, session: aiohttp.ClientSession, timeout: float = 2.0) -> None:
        async def one(w: Worker) -> None:
            try:
                status = await _get_status(session, w.url + w.health_path, timeout)
                if status == 404 and w.health_path == "/healthz":
                    w.health_path = "/health"
                    status = await _get_status(session, w.url + w.health_path, timeout)
                w.healthy = status == 200
                w.last_error = "" if w.healthy else f"{w.health_path} answered {status}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                w.healthy = False
                w.last_error = f"{w.health_path} failed: {type(exc).__name__}: {exc}"
            w.checked_at = time.monotonic()
        await asyncio.gather(*(one(w) for w in self.workers))


async def _get_status(session: aiohttp.ClientSession, url: str, timeout: float) -> int:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        return r.status
