"""`kvrelay engine --etcd URL`: the reference engine registers itself as a member of its cluster in etcd.

Once its port is bound (before its ready file is written), a prefill or decode engine puts its member key
(kind = its role, address = its URL, attributes: model, store, transport) under a lease renewed by
kvrelay/membership/registration.py; on SIGTERM the lease is revoked before the server stops, so routers
drop it at once; killed, it is dropped when the lease expires (``--etcd-ttl``).

Owns: the engine's flags for membership and the member it registers.  Must not touch: the engine or its
server (server.py calls `add_arguments`, `check` and `registrar`).
"""

from __future__ import annotations

import argparse
import socket
from typing import Awaitable, Callable

from kvrelay.membership import Member, check_cluster, check_endpoint, register_when_bound

__all__ = ["add_arguments", "check", "registrar"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--etcd", default="", metavar="URL",
                   help="register this engine (prefill or decode) in this etcd (http://HOST:PORT), under a lease, "
                        "for routers started with --etcd")
    p.add_argument("--cluster", default="default", help="with --etcd: the cluster to register in")
    p.add_argument("--name", default="", help="with --etcd: the member name (default: ROLE-HOSTNAME-PORT)")
    p.add_argument("--advertise", default="", metavar="URL",
                   help="with --etcd: the URL routers reach this engine at (default: http://HOST:PORT as bound)")
    p.add_argument("--etcd-ttl", type=int, default=5,
                   help="with --etcd: seconds of the lease; a killed engine is dropped within about this long")


def check(args: argparse.Namespace) -> None:
    """ValueError naming a bad membership flag."""
    if not args.etcd:
        return
    check_endpoint(args.etcd, "--etcd")
    check_cluster(args.cluster)
    if args.role not in ("prefill", "decode"):
        raise ValueError(f"--etcd registers a prefill or decode engine; this one is --role {args.role}")
    if args.etcd_ttl < 2:
        raise ValueError(f"--etcd-ttl {args.etcd_ttl}: give at least 2 seconds")
    if args.advertise and "://" not in args.advertise:
        raise ValueError(f"--advertise {args.advertise!r}: give http://HOST:PORT")
    Member(kind=args.role, name=args.name or "x", address="http://h:1", cluster=args.cluster)  # checks --name


def registrar(args: argparse.Namespace, attributes: dict[str, str]
              ) -> Callable[[int], Awaitable[Callable[[], Awaitable[None]] | None]] | None:
    """serve_until_signal's ``bound`` hook that registers the engine serving on the bound port (None without
    --etcd); the hook's answer revokes the registration."""
    if not args.etcd:
        return None

    def member_at(port: int) -> Member:
        return Member(kind=args.role, name=args.name or f"{args.role}-{socket.gethostname()}-{port}",
                      address=args.advertise.rstrip("/") or f"http://{args.host}:{port}", attributes=attributes,
                      cluster=args.cluster)
    return register_when_bound(args.etcd, member_at, args.etcd_ttl)
