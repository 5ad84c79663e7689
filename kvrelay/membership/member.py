"""What a cluster member is in etcd: its key and its value.

A member is one process of a kvrelay cluster (a store, a prefill or decode engine, a router) that
registered itself: ``/kvrelay/<cluster>/members/<kind>/<name>`` holds its `Member` as JSON, under the
process's lease, so the key goes when the process stops renewing it.  Names and cluster names are
``[A-Za-z0-9._-]``, so a key is never ambiguous.

Owns: `Member`, its checks, the key layout and (de)serialization.  Must not touch: etcd (etcd.py) or when
members register (registration.py).
"""

from __future__ import annotations

import re

import msgspec

__all__ = ["KINDS", "Member", "cluster_prefix", "check_cluster", "decode_member"]

KINDS = ("store", "prefill", "decode", "router")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
ROOT = b"/kvrelay/"


def check_cluster(cluster: str, flag: str = "--cluster") -> str:
    if not _NAME.match(cluster):
        raise ValueError(f"{flag} {cluster!r}: a cluster name is 1 to 128 of A-Z a-z 0-9 . _ -")
    return cluster


def cluster_prefix(cluster: str) -> bytes:
    """The prefix of every member key of ``cluster``."""
    return ROOT + check_cluster(cluster).encode() + b"/members/"


class Member(msgspec.Struct, frozen=True, kw_only=True):
    kind: str  # one of KINDS
    name: str  # unique within the cluster and kind
    address: str  # where it serves: http://HOST:PORT for engines and routers, tcp://HOST:PORT for a store
    attributes: dict[str, str] = {}
    cluster: str = "default"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"member kind {self.kind!r}: choose one of {', '.join(KINDS)}")
        if not _NAME.match(self.name):
            raise ValueError(f"member name {self.name!r}: 1 to 128 of A-Z a-z 0-9 . _ -")
        check_cluster(self.cluster)
        if "://" not in self.address:
            raise ValueError(f"member address {self.address!r}: give SCHEME://HOST:PORT")

    @property
    def key(self) -> bytes:
        return cluster_prefix(self.cluster) + f"{self.kind}/{self.name}".encode()

    def encode(self) -> bytes:
        return msgspec.json.encode(self)


def decode_member(value: bytes) -> Member | None:
    """The member a key holds, or None for a value that is not one (written by something else)."""
    try:
        return msgspec.json.decode(value, type=Member)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
        return None
