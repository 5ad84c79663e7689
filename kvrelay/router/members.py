"""The router's pools follow the cluster's membership in etcd (``kvrelay router --etcd URL``).

A `MembershipView` (kvrelay/membership/view.py) lists and watches the cluster's members; on each change
the prefill and decode members' addresses are put into (`Pool.add`) or taken out of (`Pool.remove`) the
router's pools.  Workers given on the command line (``--prefill``, ``--decode``) stay whatever etcd says.
While etcd is away the view keeps the last membership, so the pools do not change: traffic goes on to the
workers last known, and their health probes and breakers still take a dead one out of service.

Owns: the mapping from members to pool entries.  Must not touch: the pools' health, breakers or load
(pool.py), or the view's connection to etcd.
"""

from __future__ import annotations

import logging

from kvrelay.membership import MembershipView
from kvrelay.router.pool import Pool

__all__ = ["MemberPools"]

log = logging.getLogger("kvrelay.router")


class MemberPools:
    def __init__(self, endpoint: str, cluster: str, prefill: Pool, decode: Pool) -> None:
        self.pools = {"prefill": prefill, "decode": decode}
        self.static = {role: {w.url for w in pool.workers} for role, pool in self.pools.items()}
        self.added: dict[str, set[str]] = {role: set() for role in self.pools}
        self.view = MembershipView(endpoint, cluster, on_change=self.sync)

    def start(self) -> None:
        self.view.start()

    async def stop(self) -> None:
        await self.view.stop()

    def sync(self) -> None:
        """Make each pool hold its static workers and the members of its kind now in the view."""
        for role, pool in self.pools.items():
            wanted = {m.address.rstrip("/") for m in self.view.of_kind(role)
                      if m.address.startswith(("http://", "https://"))} - self.static[role]
            for url in sorted(wanted - self.added[role]):
                pool.add(url)
                log.info("membership: %s worker %s joined", role, url)
            for url in sorted(self.added[role] - wanted):
                pool.remove(url)
                log.info("membership: %s worker %s left (its lease ended)", role, url)
            self.added[role] = wanted

    def state(self) -> dict:
        return {"endpoint": self.view.client.endpoint, "cluster": self.view.cluster, "connected": self.view.connected,
                "members": len(self.view.members)}
