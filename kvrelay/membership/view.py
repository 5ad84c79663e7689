"""A process's view of a cluster's members in etcd: listed once, then followed by a watch.

`MembershipView.start()` runs a task that lists every member key of the cluster, then watches the prefix
from the revision after that list, applying each change to ``members`` and calling ``on_change()``.  When
the watch breaks (etcd killed, restarted, unreachable, or compacted past the watch), or a list every
``check_interval`` seconds fails (etcd hung: a quiet watch cannot tell) or disagrees with it, the task retries
(backoff from ``retry`` up to ``max_retry`` seconds) and, once etcd answers, lists everything again: changes
made during the gap are never missed.  Meanwhile ``members`` keeps the last membership known, so a router
keeps routing to it (``connected`` says whether the view is live).

Owns: the members dict and its updates.  Must not touch: what the members are used for (the router's
pools: kvrelay/router/members.py) or anyone's registration.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from kvrelay.membership.etcd import EtcdClient, EtcdError
from kvrelay.membership.member import Member, cluster_prefix, decode_member

__all__ = ["MembershipView"]

log = logging.getLogger("kvrelay.membership")


class MembershipView:
    def __init__(self, endpoint: str, cluster: str = "default", on_change: Callable[[], None] | None = None,
                 retry: float = 0.2, max_retry: float = 2.0, check_interval: float = 5.0) -> None:
        self.client = EtcdClient(endpoint)
        self.cluster, self.prefix = cluster, cluster_prefix(cluster)
        self.on_change = on_change or (lambda: None)
        self.retry, self.max_retry, self.check_interval = retry, max_retry, check_interval
        self.members: dict[bytes, Member] = {}
        self.connected = False
        self.listed = asyncio.Event()  # the first list arrived
        self.relists = 0  # lists after the first (each after a broken watch)
        self.failures = 0  # lists or watches that failed
        self._task: asyncio.Task | None = None

    def of_kind(self, kind: str) -> list[Member]:
        return sorted((m for m in self.members.values() if m.kind == kind), key=lambda m: m.name)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"etcd membership view of {self.cluster}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.connected = False
        await self.client.close()

    async def list_once(self) -> dict[bytes, Member]:
        """The members etcd holds now (EtcdError if it does not answer); ``members`` is not changed."""
        kvs, _ = await self.client.range_prefix(self.prefix)
        return {kv.key: m for kv in kvs if (m := decode_member(kv.value)) is not None}

    async def _run(self) -> None:
        backoff, warned = self.retry, False
        while True:
            try:
                kvs, revision = await self.client.range_prefix(self.prefix)
                fresh = {kv.key: m for kv in kvs if (m := decode_member(kv.value)) is not None}
                if self.listed.is_set():
                    self.relists += 1
                self._replace(fresh)
                self.connected, backoff = True, self.retry
                if warned:
                    log.info("etcd %s answers again: %d members", self.client.endpoint, len(fresh))
                    warned = False
                self.listed.set()
                await self._follow(revision + 1)
            except EtcdError as exc:
                self.connected = False
                self.failures += 1
                if not warned:
                    log.warning("%s; keeping the last membership known (%d members) until it answers",
                                exc, len(self.members))
                    warned = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_retry)

    async def _follow(self, revision: int) -> None:
        """Apply the watch from ``revision`` on, and every ``check_interval`` list the members again: a list
        that fails (etcd hung, or the network to it gone: a watch alone would wait forever) or that shows,
        twice running, the same membership the watch did not deliver (a watch stream that died silently)
        ends it with EtcdError, and the caller lists afresh."""
        watch = asyncio.create_task(self._watch(revision))
        try:
            unseen: dict[bytes, Member] | None = None
            while True:
                done, _ = await asyncio.wait({watch}, timeout=self.check_interval)
                if done:
                    watch.result()  # the stream broke: its EtcdError
                    raise EtcdError(f"etcd at {self.client.endpoint} ended the watch")
                fresh = await self.list_once()
                if fresh == self.members:
                    unseen = None
                elif fresh == unseen:
                    raise EtcdError(f"etcd at {self.client.endpoint} holds changes the watch did not deliver")
                else:
                    unseen = fresh  # maybe on its way through the watch: checked again next time
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)

    async def _watch(self, revision: int) -> None:
        async for batch in self.client.watch_prefix(self.prefix, revision):
            changed = False
            for ev in batch:
                if ev.deleted:
                    changed |= self.members.pop(ev.kv.key, None) is not None
                elif (m := decode_member(ev.kv.value)) is not None and self.members.get(ev.kv.key) != m:
                    self.members[ev.kv.key] = m
                    changed = True
            if changed:
                self.on_change()

    def _replace(self, fresh: dict[bytes, Member]) -> None:
        if fresh != self.members:
            self.members = fresh
            self.on_change()
