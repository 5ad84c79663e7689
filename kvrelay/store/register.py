"""`kvrelay store --etcd URL`: the store daemon registers itself as a member of its cluster in etcd.

Once its control socket is bound (before its ready file is written) the daemon puts its member key (kind
store, address = its control address, attributes: its transports' endpoints, its metrics port) under a
lease renewed from a thread of its own (kvrelay/membership/registration.py: the daemon's loop is not
asyncio); on SIGTERM the lease is revoked, killed it is dropped when the lease expires.

Owns: the store's membership flags and the member it registers.  Must not touch: the store itself.
"""

from __future__ import annotations

import argparse
import socket
from dataclasses import dataclass

from kvrelay.membership import Member, RegistrationThread, check_cluster, check_endpoint

__all__ = ["Settings", "add_arguments", "take"]


@dataclass(frozen=True, slots=True)
class Settings:
    etcd: str
    cluster: str
    name: str
    ttl: int

    def start(self, address: str, attributes: dict[str, str]) -> RegistrationThread | None:
        """Register the store serving at ``address`` (None without --etcd)."""
        if not self.etcd:
            return None
        port = address.rsplit(":", 1)[-1]
        member = Member(kind="store", name=self.name or f"store-{socket.gethostname()}-{port}", address=address,
                        attributes=attributes, cluster=self.cluster)
        reg = RegistrationThread(self.etcd, member, self.ttl)
        reg.start()  # etcd away: serve anyway, the thread registers when it answers
        return reg


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--etcd", default="", metavar="URL",
                   help="register this store in this etcd (http://HOST:PORT), under a lease")
    p.add_argument("--cluster", default="default", help="with --etcd: the cluster to register in")
    p.add_argument("--name", default="", help="with --etcd: the member name (default: store-HOSTNAME-PORT)")
    p.add_argument("--etcd-ttl", type=int, default=10, help="with --etcd: seconds of the lease")


def take(args: argparse.Namespace) -> Settings:
    """The membership flags, removed from ``args`` (the store's config takes the rest); ValueError naming a
    bad one."""
    s = Settings(args.etcd, args.cluster, args.name, args.etcd_ttl)
    for k in ("etcd", "cluster", "name", "etcd_ttl"):
        delattr(args, k)
    if s.etcd:
        check_endpoint(s.etcd, "--etcd")
        check_cluster(s.cluster)
        if s.ttl < 2:
            raise ValueError(f"--etcd-ttl {s.ttl}: give at least 2 seconds")
        Member(kind="store", name=s.name or "x", address="tcp://h:1", cluster=s.cluster)  # checks --name
    return s
