"""Hosts made of network namespaces, for `kvrelay bench hosts` and tests/multihost.

Owns: creating a topology of namespaces joined by veth pairs (addresses in 198.18.0.0/15, a /24 not used
in the root namespace), running commands in them, and removing all of it afterwards, also on failure
(and namespaces left by a run whose process is gone).  Must not touch: what runs inside.

    with Hosts(["store", "prefill", "decode", "router"]) as hosts:   # each on a veth to a bridge in a hub
        hosts.address("store")     # 198.18.N.1; the root namespace has 198.18.N.254 on the same bridge
        hosts.spawn("store", proc.kvrelay_argv(["store", ...]), log=path)   # a kvrelay.proc.ChildProcess

Needs root (CAP_NET_ADMIN) and `ip`; `unavailable()` says why not, for a skip.
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any

from kvrelay import proc

PREFIX = "kvrelay"  # namespace names: kvrelay-<pid>-<tag>-<host>


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces and veth pairs needs root"
    name = f"{PREFIX}-{os.getpid()}-probe"
    proc = _ip("netns", "add", name, check=False)
    if proc.returncode != 0:
        return f"`ip netns add` failed: {proc.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


def sweep_stale() -> None:
    """Remove namespaces of earlier runs whose process is gone (a run killed before its clean-up)."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        parts = name.split("-")
        if len(parts) >= 3 and parts[0] == PREFIX and parts[1].isdigit() and not proc.pid_alive(int(parts[1])):
            _ip("netns", "del", name, check=False)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 of 198.18.0.0/15 that no address of the root namespace is in."""
    used = _ip("-4", "-o", "addr", "show").stdout
    taken = {str(ipaddress.ip_interface(w).network) for line in used.splitlines() for w in line.split()
             if w.count(".") == 3 and "/" in w}
    nets = list(ipaddress.IPv4Network("198.18.0.0/15").subnets(new_prefix=24))[1:-1]
    random.shuffle(nets)
    for net in nets:
        if str(net) not in taken:
            return net
    raise RuntimeError("no free /24 left in 198.18.0.0/15")


class Hosts:
    """Namespaces ``names`` (plus a hub holding the bridge), each with one veth on the bridge; the root
    namespace joins the bridge too (``root_address``), so a test's own client reaches every host."""

    def __init__(self, names: Sequence[str], tag: str = "t") -> None:
        if len(names) > 200:
            raise ValueError("at most 200 hosts")
        self.names = list(names)
        self.tag = f"{tag}{random.randrange(16 ** 4):04x}"
        self.ns = {n: f"{PREFIX}-{os.getpid()}-{self.tag}-{n}" for n in self.names}
        self.hub = f"{PREFIX}-{os.getpid()}-{self.tag}-hub"
        self.net: ipaddress.IPv4Network | None = None
        self.devices: dict[str, str] = {}  # host -> its veth's name inside its namespace
        self.root_dev = ""
        self._made: list[str] = []

    def address(self, name: str) -> str:
        assert self.net is not None
        return str(self.net[self.names.index(name) + 1])

    @property
    def root_address(self) -> str:
        assert self.net is not None
        return str(self.net[254])

    def __enter__(self) -> "Hosts":
        sweep_stale()
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        self.net = _free_subnet()
        prefix = self.net.prefixlen
        _ip("netns", "add", self.hub)
        self._made.append(self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for i, name in enumerate(self.names):
            ns = self.ns[name]
            _ip("netns", "add", ns)
            self._made.append(ns)
            inner, outer = f"kv{self.tag}h{i}", f"kv{self.tag}p{i}"
            _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "netns", self.hub)
            _ip("-n", self.hub, "link", "set", outer, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(name)}/{prefix}", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            self.devices[name] = inner
        self.root_dev = f"kv{self.tag}r"
        outer = f"kv{self.tag}q"
        _ip("link", "add", self.root_dev, "type", "veth", "peer", "name", outer)
        _ip("link", "set", outer, "netns", self.hub)
        _ip("-n", self.hub, "link", "set", outer, "master", "br0", "up")
        _ip("addr", "add", f"{self.root_address}/{prefix}", "dev", self.root_dev)
        _ip("link", "set", self.root_dev, "up")

    def command(self, name: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside host ``name``'s namespace."""
        return ["ip", "netns", "exec", self.ns[name], *argv]

    def spawn(self, name: str, argv: Sequence[str], **kw: Any) -> proc.ChildProcess:
        """``argv`` started inside host ``name``'s namespace through `kvrelay.proc.spawn` (``kw`` as there)."""
        return proc.spawn(self.command(name, argv), name=kw.pop("name", name), **kw)

    def close(self) -> None:
        """Remove every namespace made (their veths go with them) and the root namespace's veth."""
        if self.root_dev:
            _ip("link", "del", self.root_dev, check=False)
        for ns in reversed(self._made):
            _ip("netns", "del", ns, check=False)
        self._made.clear()
