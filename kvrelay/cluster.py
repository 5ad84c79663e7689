"""The cluster file of `kvrelay up -f cluster.yaml`: which host runs what, at which address, and this
host's part of it.

Owns: the schema (`ClusterSpec` and its parts, validated on load with errors that name the file and the
field: ``cluster.yaml: hosts.b.decode[0].port: ...``), finding which host this machine is (``--host NAME``,
or the one host whose address is local), and the per-host plan (`HostPlan`: the `kvrelay` subcommands to
run, in order, and the environment they get).  Must not touch: starting or supervising the processes
(launcher.py, supervisor.py) or what they do.

    transport: tcp                 # between hosts: tcp or nixl (an engine on the store's host uses shm)
    keys: /etc/kvrelay/keys        # `kvrelay keys DIR`; required once any address is not loopback
    model: {checkpoint: /models/m} # optional; default: the seeded random reference model
    env: {UCX_TLS: "tcp,self"}     # optional, for every process (a host may add its own)
    hosts:
      a: {address: 198.18.0.1, store: {port: 5600}, prefill: [{port: 8100}], router: {port: 8000}}
      b: {address: 198.18.0.2, decode: [{port: 8200}]}

Every host binds and advertises its ``address`` (an IP literal: what the other hosts connect to).  Ports are
fixed (the other hosts must know them): defaults store 5600, router 8000, prefill 8100+i, decode 8200+i.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TRANSPORTS = ("tcp", "nixl", "shm")
DEFAULT_PORTS = {"store": 5600, "router": 8000, "prefill": 8100, "decode": 8200}
_TOP = ("transport", "keys", "model", "env", "hosts")
_HOST = ("address", "env", "store", "prefill", "decode", "router")
_STORE = ("port", "pool_size", "ssd_dir")
_ENGINE = ("port", "block_size", "threads")
_ROUTER = ("port",)
_DEFAULT_BLOCK = {"prefill": 16, "decode": 32}


class ClusterError(ValueError):
    """A cluster file that cannot be used: the message names the file and the field."""


@dataclass(slots=True)
class EngineSpec:
    role: str  # prefill | decode
    port: int
    block_size: int
    threads: int = 0


@dataclass(slots=True)
class HostSpec:
    name: str
    address: str
    env: dict[str, str] = field(default_factory=dict)
    store: dict[str, Any] | None = None  # port, pool_size, ssd_dir
    engines: list[EngineSpec] = field(default_factory=list)
    router_port: int | None = None

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.address).is_loopback


@dataclass(slots=True)
class ClusterSpec:
    source: str
    transport: str
    keys: str
    checkpoint: str | None
    env: dict[str, str]
    hosts: dict[str, HostSpec]

    @property
    def store_host(self) -> HostSpec:
        return next(h for h in self.hosts.values() if h.store is not None)

    @property
    def store_address(self) -> str:
        h = self.store_host
        assert h.store is not None
        return f"tcp://{_url_host(h.address)}:{h.store['port']}"

    def urls(self, role: str) -> list[str]:
        return [f"http://{_url_host(h.address)}:{e.port}" for h in self.hosts.values() for e in h.engines
                if e.role == role]


@dataclass(slots=True)
class HostPlan:
    """What `kvrelay up -f` runs on one host: ``(name, kvrelay argv)`` in start order, and the extra
    environment of every process.  ``remote_store``: the engines here use a store on another host, so the
    launcher waits until it answers before starting them (a store client needs its store at start-up)."""

    host: HostSpec
    processes: list[tuple[str, list[str]]]
    env: dict[str, str]
    store_address: str
    remote_store: bool


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def load(path: str | os.PathLike[str], keys: str = "") -> ClusterSpec:
    """Read and validate a cluster file; ClusterError naming the file and the field otherwise.  ``keys``
    (`kvrelay up --keys DIR`) replaces the file's ``keys``; $KVRELAY_KEYS is used when neither gives one."""
    src = str(path)
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise ClusterError(f"{src}: cannot read it ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ClusterError(f"{src}: malformed YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    if isinstance(data, dict):
        keys = keys or data.get("keys") or os.environ.get("KVRELAY_KEYS", "")
        if keys:
            data["keys"] = keys
    return parse(data, src)


def parse(data: Any, src: str = "cluster.yaml") -> ClusterSpec:
    """Validate the mapping of a cluster file (``src`` names it in errors)."""
    def fail(where: str, why: str) -> ClusterError:
        return ClusterError(f"{src}: {where}: {why}")

    top = _mapping(data, src, "the file", _TOP, fail)
    transport = top.get("transport", "tcp")
    if transport not in TRANSPORTS:
        raise fail("transport", f"{transport!r} is not one of {', '.join(TRANSPORTS)}")
    keys = top.get("keys", "")
    if not isinstance(keys, str):
        raise fail("keys", f"{keys!r} is not a directory path (a string)")
    model = _mapping(top.get("model", {}), src, "model", ("checkpoint",), fail)
    checkpoint = model.get("checkpoint")
    if checkpoint is not None and not (isinstance(checkpoint, str) and checkpoint):
        raise fail("model.checkpoint", f"{checkpoint!r} is not a directory path")
    env = _env(top.get("env", {}), "env", fail)
    raw_hosts = top.get("hosts")
    if not isinstance(raw_hosts, dict) or not raw_hosts:
        raise fail("hosts", "missing or empty: give a mapping of host name to what runs there")
    hosts = {str(name): _host(str(name), body, src, fail) for name, body in raw_hosts.items()}
    _check_cluster(hosts, transport, keys, fail)
    return ClusterSpec(src, transport, keys, checkpoint, env, hosts)


def _mapping(value: Any, src: str, where: str, known: tuple[str, ...], fail) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise fail(where, f"expected a mapping, got {type(value).__name__} {value!r}")
    unknown = sorted(str(k) for k in value if k not in known)
    if unknown:
        raise fail(where, f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; known: "
                          f"{', '.join(known)}")
    return value


def _env(value: Any, where: str, fail) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise fail(where, "expected a mapping of environment variable names to values")
    for k, v in value.items():
        if not isinstance(v, (str, int, float)) or isinstance(v, bool):
            raise fail(f"{where}.{k}", f"{v!r} is not a string or a number")
    return {k: str(v) for k, v in value.items()}


def _port(value: Any, where: str, fail) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise fail(where, f"{value!r} is not a port in 1..65535 (a cluster's ports are fixed: other hosts "
                          f"connect to them)")
    return value


def _host(name: str, body: Any, src: str, fail) -> HostSpec:
    where = f"hosts.{name}"
    body = _mapping(body, src, where, _HOST, fail)
    address = body.get("address")
    if not isinstance(address, str):
        raise fail(f"{where}.address", f"missing or not a string ({address!r}): give the IP address this host "
                                       f"binds and the others connect to, e.g. 198.18.0.1")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise fail(f"{where}.address", f"{address!r} is not an IP address (a host name is not accepted: every "
                                       f"process binds it)") from None
    if ip.is_unspecified or ip.is_multicast:
        raise fail(f"{where}.address", f"{address} cannot be bound and connected to: give this host's own address")
    host = HostSpec(name, str(ip), _env(body.get("env", {}), f"{where}.env", fail))
    if body.get("store") is not None:
        store = dict(_mapping(body["store"], src, f"{where}.store", _STORE, fail))
        store["port"] = _port(store.get("port", DEFAULT_PORTS["store"]), f"{where}.store.port", fail)
        for key in ("pool_size", "ssd_dir"):
            if key in store and not isinstance(store[key], (str, int)):
                raise fail(f"{where}.store.{key}", f"{store[key]!r} is not a string")
        host.store = store
    for role in ("prefill", "decode"):
        items = body.get(role) or []
        if isinstance(items, dict):
            items = [items]
        if not isinstance(items, list):
            raise fail(f"{where}.{role}", f"expected a list of engines (each a mapping, {{}} for the defaults), "
                                          f"got {items!r}")
        for i, item in enumerate(items):
            at = f"{where}.{role}[{i}]"
            e = _mapping(item or {}, src, at, _ENGINE, fail)
            bs = e.get("block_size", _DEFAULT_BLOCK[role])
            threads = e.get("threads", 0)
            for key, v, least in (("block_size", bs, 1), ("threads", threads, 0)):
                if not isinstance(v, int) or isinstance(v, bool) or v < least:
                    raise fail(f"{at}.{key}", f"{v!r} is not an integer >= {least}")
            host.engines.append(EngineSpec(role, _port(e.get("port", DEFAULT_PORTS[role] + i), f"{at}.port", fail),
                                           bs, threads))
    if body.get("router") is not None:
        r = _mapping(body["router"] or {}, src, f"{where}.router", _ROUTER, fail)
        host.router_port = _port(r.get("port", DEFAULT_PORTS["router"]), f"{where}.router.port", fail)
    if host.store is None and not host.engines and host.router_port is None:
        raise fail(where, "runs nothing: give it a store, prefill or decode engines, or a router")
    taken: dict[int, str] = {}
    named = [(host.store["port"], "store.port")] if host.store else []
    named += [(e.port, f"{e.role}[{sum(x.role == e.role for x in host.engines[:i])}].port")
              for i, e in enumerate(host.engines)]
    named += [(host.router_port, "router.port")] if host.router_port is not None else []
    for port, what in named:
        if port in taken:
            raise fail(f"{where}.{what}", f"port {port} is also {where}.{taken[port]}'s")
        taken[port] = what
    return host


def _check_cluster(hosts: dict[str, HostSpec], transport: str, keys: str, fail) -> None:
    stores = [h.name for h in hosts.values() if h.store is not None]
    if len(stores) != 1:
        raise fail("hosts", f"exactly one host runs the store; {'none does' if not stores else ', '.join(stores)}")
    by_address: dict[str, str] = {}
    for h in hosts.values():
        if h.address in by_address and not h.loopback:
            raise fail(f"hosts.{h.name}.address", f"{h.address} is also hosts.{by_address[h.address]}'s: "
                                                  f"give each host its own address")
        by_address.setdefault(h.address, h.name)
    roles = {role: [e for h in hosts.values() for e in h.engines if e.role == role] for role in ("prefill", "decode")}
    if not roles["decode"]:
        raise fail("hosts", "no decode engine: give some host `decode: [{}]`")
    if not any(h.router_port is not None for h in hosts.values()):
        raise fail("hosts", "no router: give some host `router: {port: 8000}` (clients send requests there)")
    store_host = next(h for h in hosts.values() if h.store is not None)
    if transport == "shm":
        away = [h.name for h in hosts.values() if h.engines and h.address != store_host.address]
        if away:
            raise fail("transport", f"shm moves KV within one host only, and hosts {', '.join(away)} run engines "
                                    f"away from the store's host {store_host.name}: use tcp or nixl")
    outside = [h for h in hosts.values() if not h.loopback]
    if outside and not keys:
        raise fail("keys", f"hosts.{outside[0].name}.address {outside[0].address} is not loopback, and a process "
                           f"binds another address only with authentication: set `keys: DIR` (`kvrelay keys DIR` "
                           f"writes one; copy it to every host)")


# ---- this host ------------------------------------------------------------------------------------
def is_local_address(address: str) -> bool:
    """Whether this machine (its network namespace) holds ``address``: binding it succeeds (no traffic)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.bind((address, 0))
        except OSError:
            return False
    return True


def find_host(spec: ClusterSpec, name: str | None) -> HostSpec:
    """This host's part: ``name`` (``--host``), else the one host whose address is local."""
    if name:
        if name not in spec.hosts:
            raise ClusterError(f"{spec.source}: --host {name!r} is not one of its hosts ({', '.join(spec.hosts)})")
        host = spec.hosts[name]
        if not is_local_address(host.address):
            raise ClusterError(f"{spec.source}: hosts.{name}.address {host.address} is not an address of this "
                               f"machine, so nothing here can bind it: run this on host {name}, or fix the address")
        return host
    local = [h for h in spec.hosts.values() if is_local_address(h.address)]
    if len(local) != 1:
        found = ", ".join(f"{h.name} ({h.address})" for h in local) or "none"
        raise ClusterError(f"{spec.source}: cannot tell which host this is: the hosts whose address is local here "
                           f"are {found}; pass --host NAME")
    return local[0]


def plan(spec: ClusterSpec, host: HostSpec, pool_name: str, workdir: Path) -> HostPlan:
    """The processes ``host`` runs, in start order (store, engines, router), with their flags."""
    if spec.keys:
        _check_keys(spec, host)
    if spec.checkpoint and not Path(spec.checkpoint).is_dir():
        raise ClusterError(f"{spec.source}: model.checkpoint: {spec.checkpoint} is not a directory on this host "
                           f"({host.name}): every host needs its own copy")
    addr = host.address
    store_host = spec.store_host
    model = ["--checkpoint", spec.checkpoint] if spec.checkpoint else []
    procs: list[tuple[str, list[str]]] = []
    if host.store is not None:
        s = host.store
        remote = sorted({spec.transport} - {"shm"})
        args = ["store", "--host", addr, "--port", str(s["port"]), "--metrics-port", "0", "--pool-name", pool_name,
                "--transports", ",".join(["shm", *remote])]
        if "pool_size" in s:
            args += ["--pool-size", str(s["pool_size"])]
        ssd = s.get("ssd_dir", str(workdir / "ssd"))
        if ssd and ssd != "none":
            args += ["--ssd-dir", str(ssd)]
        procs.append(("store", args))
    counts = {"prefill": 0, "decode": 0}
    for e in host.engines:
        transport = "shm" if host.address == store_host.address else spec.transport
        args = ["engine", "--role", e.role, "--host", addr, "--port", str(e.port), *model, "--store",
                spec.store_address, "--transport", transport, "--block-size", str(e.block_size)]
        if e.threads:
            args += ["--threads", str(e.threads)]
        procs.append((f"{e.role}{counts[e.role]}", args))
        counts[e.role] += 1
    if host.router_port is not None:
        args = ["router", "--host", addr, "--port", str(host.router_port), "--store", spec.store_address]
        for url in spec.urls("prefill"):
            args += ["--prefill", url]
        for url in spec.urls("decode"):
            args += ["--decode", url]
        procs.append(("router", args))
    env = {**spec.env, **host.env}
    if spec.keys:
        env.setdefault("KVRELAY_KEYS", spec.keys)
    if spec.transport == "nixl" and "UCX_NET_DEVICES" not in env and not host.loopback:
        device = interface_of(addr)
        if device:
            env["UCX_NET_DEVICES"] = device
    return HostPlan(host, procs, env, spec.store_address, remote_store=host.store is None and bool(host.engines))


def _check_keys(spec: ClusterSpec, host: HostSpec) -> None:
    if not Path(spec.keys).is_dir():
        raise ClusterError(f"{spec.source}: keys: {spec.keys} is not a directory on this host ({host.name}): copy the "
                           f"keys directory (`kvrelay keys DIR` wrote it) to every host")
    try:
        from kvrelay.security import KeysError, load
    except ImportError:  # no authentication in this build: the processes refuse the keys themselves
        return
    try:
        load(spec.keys)
    except KeysError as exc:
        raise ClusterError(f"{spec.source}: keys: {exc}") from None


def interface_of(address: str) -> str | None:
    """The network interface holding IPv4 ``address`` here (UCX_NET_DEVICES for nixl), or None."""
    import fcntl
    import struct
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                got = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on it
                continue
            if socket.inet_ntoa(got[20:24]) == address:
                return name
    return None
