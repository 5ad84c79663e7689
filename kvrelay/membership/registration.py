"""A member's registration in etcd: its key under a lease, kept alive, and put back when etcd comes back.

`Registration.start()` runs a task that grants a lease of ``ttl`` seconds, puts the member's key under it
and renews the lease every ``ttl / 3`` seconds.  When etcd does not answer, the task retries (backoff from
``retry`` up to ``ttl / 3`` seconds); when a renewal finds the lease gone (it expired while etcd was away,
or etcd came back with a fresh data dir), it grants a new lease and puts the key again, so the member is
listed again within a retry of etcd being back.  ``stop()`` revokes the lease: the key goes at once,
rather than a TTL later (a process killed without ``stop()`` is dropped when its lease expires).

Owns: the lease and the key of one member.  Must not touch: other members' keys, or what the process does
while etcd is away (it keeps serving: membership is for finding processes, not for running them).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Awaitable, Callable

from kvrelay.membership.etcd import EtcdClient, EtcdError
from kvrelay.membership.member import Member

__all__ = ["Registration", "RegistrationThread", "register_when_bound"]

log = logging.getLogger("kvrelay.membership")


class Registration:
    def __init__(self, endpoint: str, member: Member, ttl: int = 10, retry: float = 0.2) -> None:
        if ttl < 2:
            raise ValueError(f"lease TTL {ttl}s: give at least 2 seconds (it is renewed every TTL/3)")
        self.client = EtcdClient(endpoint)
        self.member, self.ttl, self.retry = member, ttl, retry
        self.lease = 0
        self.registered = asyncio.Event()  # set while the key is in etcd as far as this process knows
        self.registrations = 0  # how many times the key was put (1 + re-registrations after etcd came back)
        self.failures = 0  # requests to etcd that failed
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"etcd registration of {self.member.name}")

    async def wait_registered(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.registered.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def _register(self) -> None:
        self.lease = await self.client.grant(self.ttl)
        await self.client.put(self.member.key, self.member.encode(), self.lease)
        self.registrations += 1
        self.registered.set()
        log.info("registered %s %s (%s) in etcd %s, lease %x", self.member.kind, self.member.name,
                 self.member.address, self.client.endpoint, self.lease)

    async def _run(self) -> None:
        backoff, warned = self.retry, False
        renew = self.ttl / 3
        while True:
            try:
                if not self.registered.is_set():
                    await self._register()
                    backoff, warned = self.retry, False
                await asyncio.sleep(renew)  # the renewal period (not a wait for an event: a lease is time)
                if await self.client.keepalive(self.lease) <= 0:
                    log.warning("etcd %s no longer knows the lease of %s: registering again", self.client.endpoint,
                                self.member.name)
                    self.registered.clear()
            except EtcdError as exc:
                self.registered.clear()
                self.failures += 1
                if not warned:
                    log.warning("%s; %s keeps serving and registers again when etcd answers", exc, self.member.name)
                    warned = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, renew)

    async def stop(self, revoke: bool = True) -> None:
        """End the renewals; ``revoke``: delete the key now (best effort: etcd may be away)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if revoke and self.registered.is_set():
            try:
                await self.client.revoke(self.lease)
            except EtcdError as exc:
                log.warning("could not revoke the lease of %s: %s (its key goes when the lease expires)",
                            self.member.name, exc)
        self.registered.clear()
        await self.client.close()


def register_when_bound(endpoint: str, member_at: Callable[[int], Member], ttl: int
                        ) -> Callable[[int], Awaitable[Callable[[], Awaitable[None]]]]:
    """kvrelay.serving.serve_until_signal's ``bound`` hook: once the port is bound, register
    ``member_at(port)`` (waiting up to 5 s for etcd: a process whose etcd is away serves anyway, and
    registers when etcd answers); the hook's answer revokes it, before the server stops."""
    async def bound(port: int) -> Callable[[], Awaitable[None]]:
        reg = Registration(endpoint, member_at(port), ttl)
        reg.start()
        await reg.wait_registered(5.0)
        return reg.stop
    return bound


class RegistrationThread:
    """A `Registration` for a process that runs no asyncio loop (the store daemon): its own loop, in a daemon
    thread."""

    def __init__(self, endpoint: str, member: Member, ttl: int = 10) -> None:
        self.endpoint, self.member, self.ttl = endpoint, member, ttl
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                       name=f"etcd registration of {member.name}")
        self.reg: Registration | None = None

    def start(self, wait: float = 5.0) -> bool:
        """Start renewing; True once registered, False if etcd did not answer within ``wait`` seconds (the
        thread keeps trying)."""
        self.thread.start()

        async def begin() -> bool:
            self.reg = Registration(self.endpoint, self.member, self.ttl)
            self.reg.start()
            return await self.reg.wait_registered(wait)
        return asyncio.run_coroutine_threadsafe(begin(), self.loop).result(wait + 5.0)

    def stop(self) -> None:
        """Revoke (best effort, a few seconds at most) and end the thread."""
        if self.reg is not None:
            try:
                asyncio.run_coroutine_threadsafe(self.reg.stop(), self.loop).result(5.0)
            except TimeoutError:
                log.warning("revoking the lease of %s took over 5 s: left to expire", self.member.name)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5.0)
