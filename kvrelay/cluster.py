"""The cluster file of `kvrelay up -f cluster.yaml`: which host runs what, and at which address.

Owns: the schema (`ClusterSpec` and its parts, validated on load with errors that name the file and the
field: ``cluster.yaml: hosts.b.decode[0].port: ...``).  Must not touch: this host's part of it (which host
this machine is and the processes it runs: clusterplan.py), starting or supervising them (launcher.py).

    transport: tcp                 # between hosts: tcp or nixl (an engine on the store's host uses shm)
    keys: /etc/kvrelay/keys        # `kvrelay keys DIR`; required once any address is not loopback
    model: {checkpoint: /models/m} # optional; default: the seeded random reference model
    engine: reference              # or vllm (vLLM servers with the kvrelay connector; need model.checkpoint)
    env: {UCX_TLS: "tcp,self"}     # optional, for every process (a host may add its own)
    etcd: http://127.0.0.1:2379    # optional: stores and reference engines register there, the router follows
                                   # (engines started later with `kvrelay engine --etcd` join it); http://
                                   # on loopback, or https://198.18.0.1:2379 with `kvrelay keys DIR --etcd-host`
    hosts:
      a: {address: 198.18.0.1, store: {port: 5600}, prefill: [{port: 8100}], router: {port: 8000}}
      b: {address: 198.18.0.2, decode: [{port: 8200}]}

A store on every host that runs engines (instead of one for the cluster) keeps each KV byte to one network
crossing: every engine publishes into its own host's store over shm, and a decode pulls each request from
the store of its prefill's host (the router names it in the decode leg's signed params; the decode is
given the other stores with ``--peer-store`` and refuses any other):

    hosts:
      a: {address: 198.18.0.1, store: {}, prefill: [{}]}
      b: {address: 198.18.0.2, store: {}, decode: [{keep_remote_prefix: true}], router: {}}

There every store also publishes its KV events on its host's address, at ``store.events_port`` (default the
store's port + 1) and its replay socket at the next port (CURVE-authenticated with the keys, as every plane
off loopback), and the router follows them all: a request whose prefix some host's store holds goes to a
decode with that store as a hint (prefix reuse across hosts).  ``keep_remote_prefix: true`` on a reference
decode keeps a copy of such a prefix in its own host's store (`kvrelay engine --keep-remote-prefix`).

Every host binds and advertises its ``address`` (an IP literal: what the other hosts connect to).  Ports are
fixed (the other hosts must know them): defaults store 5600, router 8000, prefill 8100+i, decode 8200+i.

vLLM engines: ``engine: vllm`` cluster-wide or on a host (``hosts.b.engine``; a host may also give its own copy's
path, ``hosts.b.checkpoint``), block size 32 by default (a multiple of 32), each server on the host's address
(with keys, vLLM's ``--api-key`` is the key directory's token) and on its own core; the vLLM servers on the
router's host publish their KV events to it over ``ipc://`` (a unix socket: other hosts' servers publish none).
``tensor_parallel_size: N`` on a vLLM engine runs it with N ranks, a core each; where the servers' TP sizes
differ, every one of them is given the same ``head_slices`` (kvrelay.connector.heads), computed from the TP sizes
and the checkpoint's KV head count, so that each decode rank pulls its share of any prefill's chunks.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvrelay.membership import EtcdTLS, check_endpoint

TRANSPORTS = ("tcp", "nixl", "shm")
DEFAULT_PORTS = {"store": 5600, "router": 8000, "prefill": 8100, "decode": 8200}
_TOP = ("transport", "keys", "model", "engine", "env", "hosts", "etcd")
_HOST = ("address", "env", "engine", "checkpoint", "store", "prefill", "decode", "router")
ENGINES = ("reference", "vllm")
_STORE = ("port", "pool_size", "ssd_dir", "events_port")
_ENGINE = ("port", "block_size", "threads", "keep_remote_prefix", "tensor_parallel_size")
_ROUTER = ("port",)
_DEFAULT_BLOCK = {"prefill": 16, "decode": 32}
_VLLM_BLOCK = 32  # vLLM's CPU attention wants a multiple of 32


class ClusterError(ValueError):
    """A cluster file that cannot be used: the message names the file and the field."""


@dataclass(slots=True)
class EngineSpec:
    role: str  # prefill | decode
    port: int
    block_size: int
    threads: int = 0
    keep_remote_prefix: bool = False  # a decode with a store on every host: keep a prefix loaded from another's
    tp: int = 1  # a vLLM engine's tensor-parallel size (a core per rank)


@dataclass(slots=True)
class HostSpec:
    name: str
    address: str
    env: dict[str, str] = field(default_factory=dict)
    store: dict[str, Any] | None = None  # port, pool_size, ssd_dir, events_port (KV events; used per host)
    engines: list[EngineSpec] = field(default_factory=list)
    router_port: int | None = None
    engine: str = "reference"  # reference | vllm
    checkpoint: str | None = None  # this host's copy of the model (default: the cluster's model.checkpoint)

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
    etcd: str = ""  # http://127.0.0.1:PORT: its processes register there, and the router follows (membership)

    @property
    def store_host(self) -> HostSpec:
        """The (first) host with a store: the cluster's one store unless `per_host`."""
        return next(h for h in self.hosts.values() if h.store is not None)

    @property
    def store_address(self) -> str:
        return _store_address(self.store_host)

    @property
    def per_host(self) -> bool:
        """A store on every host that runs engines (parse() checked it), not one for the whole cluster."""
        return sum(h.store is not None for h in self.hosts.values()) > 1

    @property
    def stores(self) -> list[str]:
        """Every store's control address, in the file's order of hosts."""
        return [_store_address(h) for h in self.hosts.values() if h.store is not None]

    def store_of(self, host: HostSpec) -> HostSpec:
        """The host whose store ``host``'s engines publish into and pull from first: its own, else the one store."""
        return host if host.store is not None else self.store_host

    def prefill_stores(self) -> list[tuple[str, str]]:
        """(prefill URL, the control address of the store it publishes into), for every prefill engine."""
        return [(f"http://{_url_host(h.address)}:{e.port}", _store_address(self.store_of(h)))
                for h in self.hosts.values() for e in h.engines if e.role == "prefill"]

    def urls(self, role: str) -> list[str]:
        return [f"http://{_url_host(h.address)}:{e.port}" for h in self.hosts.values() for e in h.engines
                if e.role == role]


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _store_address(host: HostSpec) -> str:
    assert host.store is not None  # only hosts with a store are asked
    return f"tcp://{_url_host(host.address)}:{host.store['port']}"


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
    checkpoint = _checkpoint(model.get("checkpoint"), "model.checkpoint", fail)
    engine = _engine(top.get("engine", "reference"), "engine", fail)
    env = _env(top.get("env", {}), "env", fail)
    raw_hosts = top.get("hosts")
    if not isinstance(raw_hosts, dict) or not raw_hosts:
        raise fail("hosts", "missing or empty: give a mapping of host name to what runs there")
    hosts = {str(name): _host(str(name), body, src, fail, engine, checkpoint) for name, body in raw_hosts.items()}
    etcd = _etcd(top.get("etcd", ""), fail, keys)
    _check_cluster(hosts, transport, keys, fail, etcd)
    return ClusterSpec(src, transport, keys, checkpoint, env, hosts, etcd)


def _etcd(value: Any, fail, keys: str = "") -> str:
    """``etcd:``, an http:// URL of a loopback etcd, or an https:// one reached with the key directory's etcd
    client certificate (`kvrelay keys DIR --etcd-host HOST`; "" without one)."""
    if not value:
        return ""
    try:
        url = check_endpoint(str(value), "etcd")
        if url.startswith("https://"):
            if not keys:
                raise ValueError(f"{value!r}: an https:// etcd is reached with the key directory's client "
                                 f"certificate: set `keys: DIR` (written with `kvrelay keys DIR --etcd-host HOST`)")
            if Path(keys).is_dir():  # else _check_keys says so on the host that runs the plan
                EtcdTLS.from_keys_dir(keys)
    except ValueError as exc:
        raise fail("etcd", str(exc).split(": ", 1)[-1] if str(exc).startswith("etcd ") else str(exc)) from None
    return url


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


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


def _checkpoint(value: Any, where: str, fail) -> str | None:
    if value is not None and not (isinstance(value, str) and value):
        raise fail(where, f"{value!r} is not a directory path")
    return value


def _engine(value: Any, where: str, fail) -> str:
    if value not in ENGINES:
        raise fail(where, f"{value!r} is not one of {', '.join(ENGINES)}")
    return str(value)


def _port(value: Any, where: str, fail) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise fail(where, f"{value!r} is not a port in 1..65535 (a cluster's ports are fixed: other hosts "
                          f"connect to them)")
    return value


def _host(name: str, body: Any, src: str, fail, engine: str = "reference", checkpoint: str | None = None
          ) -> HostSpec:
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
    host = HostSpec(name, str(ip), _env(body.get("env", {}), f"{where}.env", fail),
                    engine=_engine(body.get("engine", engine), f"{where}.engine", fail),
                    checkpoint=_checkpoint(body.get("checkpoint"), f"{where}.checkpoint", fail) or checkpoint)
    if body.get("store") is not None:
        store = dict(_mapping(body["store"], src, f"{where}.store", _STORE, fail))
        store["port"] = _port(store.get("port", DEFAULT_PORTS["store"]), f"{where}.store.port", fail)
        events = store.get("events_port", store["port"] + 1 if store["port"] < 65534 else 0)
        store["events_port"] = _port(events, f"{where}.store.events_port", fail)
        if store["events_port"] == 65535:
            raise fail(f"{where}.store.events_port", "65535 leaves no port for the replay socket (the next one)")
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
            bs = e.get("block_size", _VLLM_BLOCK if host.engine == "vllm" else _DEFAULT_BLOCK[role])
            threads = e.get("threads", 0)
            for key, v, least in (("block_size", bs, 1), ("threads", threads, 0)):
                if not isinstance(v, int) or isinstance(v, bool) or v < least:
                    raise fail(f"{at}.{key}", f"{v!r} is not an integer >= {least}")
            if host.engine == "vllm" and bs % _VLLM_BLOCK:
                raise fail(f"{at}.block_size", f"{bs} is not a multiple of {_VLLM_BLOCK} (vLLM's CPU attention)")
            keep = e.get("keep_remote_prefix", False)
            if not isinstance(keep, bool):
                raise fail(f"{at}.keep_remote_prefix", f"{keep!r} is not true or false")
            if keep and (role != "decode" or host.engine != "reference"):
                raise fail(f"{at}.keep_remote_prefix", "only a reference decode engine keeps a prefix it loaded "
                                                       "from another host's store: remove it here")
            tp = e.get("tensor_parallel_size", 1)
            if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
                raise fail(f"{at}.tensor_parallel_size", f"{tp!r} is not an integer >= 1")
            if tp > 1 and host.engine != "vllm":
                raise fail(f"{at}.tensor_parallel_size", "applies to vLLM engines (engine: vllm) only")
            host.engines.append(EngineSpec(role, _port(e.get("port", DEFAULT_PORTS[role] + i), f"{at}.port", fail),
                                           bs, threads, keep, tp))
    if body.get("router") is not None:
        r = _mapping(body["router"] or {}, src, f"{where}.router", _ROUTER, fail)
        host.router_port = _port(r.get("port", DEFAULT_PORTS["router"]), f"{where}.router.port", fail)
    if host.store is None and not host.engines and host.router_port is None:
        raise fail(where, "runs nothing: give it a store, prefill or decode engines, or a router")
    if host.engine == "vllm" and host.engines and not host.checkpoint:
        raise fail(f"{where}.engine", "vllm needs a checkpoint directory (config.json + *.safetensors): give "
                                      "model.checkpoint, or this host's own checkpoint")
    taken: dict[int, str] = {}
    for port, what in _ports(host):
        if port in taken:
            raise fail(f"{where}.{what}", f"port {port} is also {where}.{taken[port]}'s")
        taken[port] = what
    return host


def _ports(host: HostSpec) -> list[tuple[int, str]]:
    """The fixed ports ``host`` binds (its store's KV-event ports aside), each with its field."""
    named = [(host.store["port"], "store.port")] if host.store else []
    named += [(e.port, f"{e.role}[{sum(x.role == e.role for x in host.engines[:i])}].port")
              for i, e in enumerate(host.engines)]
    named += [(host.router_port, "router.port")] if host.router_port is not None else []
    return named


def _check_cluster(hosts: dict[str, HostSpec], transport: str, keys: str, fail, etcd: str = "") -> None:
    stores = [h.name for h in hosts.values() if h.store is not None]
    if not stores:
        raise fail("hosts", "exactly one host runs the store; none does (or give every host that runs engines its "
                            "own `store: {}`)")
    if len(stores) > 1:  # a store per host: every engine host has its own, and every store serves its host's engines
        for h in hosts.values():
            if h.engines and h.store is None:
                raise fail(f"hosts.{h.name}", f"runs engines but no store, while hosts {', '.join(stores)} run one "
                                              f"each: give it `store: {{}}` too (a store on every host that runs "
                                              f"engines), or keep exactly one store for the whole cluster")
            if h.store is not None and not h.engines:
                raise fail(f"hosts.{h.name}.store", "this host runs no engines, and with a store on several hosts "
                                                    "each store serves its own host's engines: remove it, or keep "
                                                    "exactly one store for the whole cluster")
        taken: dict[tuple[str, int], str] = {}
        for h in hosts.values():
            if h.store is not None:
                at = (h.address, h.store["port"])
                if at in taken:
                    raise fail(f"hosts.{h.name}.store.port", f"{h.address}:{at[1]} is also hosts.{taken[at]}'s "
                                                             f"store: give each store its own port")
                taken[at] = h.name
        _check_event_ports(hosts, fail)
    else:
        for h in hosts.values():
            for i, e in enumerate(x for x in h.engines if x.role == "decode"):
                if e.keep_remote_prefix:
                    raise fail(f"hosts.{h.name}.decode[{i}].keep_remote_prefix", "with one store for the cluster "
                                                                                 "no prefix is another host's: "
                                                                                 "remove it, or give every host "
                                                                                 "that runs engines its own store")
    by_address: dict[str, str] = {}
    for h in hosts.values():
        if h.address in by_address and not h.loopback:
            raise fail(f"hosts.{h.name}.address", f"{h.address} is also hosts.{by_address[h.address]}'s: "
                                                  f"give each host its own address")
        by_address.setdefault(h.address, h.name)
    roles = {role: [e for h in hosts.values() for e in h.engines if e.role == role] for role in ("prefill", "decode")}
    if not roles["decode"] and not etcd:  # with etcd, decode engines may join at run time
        raise fail("hosts", "no decode engine: give some host `decode: [{}]` (or `etcd:`, for engines that join "
                            "at run time)")
    if not any(h.router_port is not None for h in hosts.values()):
        raise fail("hosts", "no router: give some host `router: {port: 8000}` (clients send requests there)")
    store_host = next(h for h in hosts.values() if h.store is not None)
    if transport == "shm":
        if len(stores) > 1:
            engine_hosts = {h.address for h in hosts.values() if h.engines}
            if len(engine_hosts) > 1:
                raise fail("transport", f"shm moves KV within one host only, and a decode pulls from the stores of "
                                        f"the other hosts ({', '.join(stores)}): use tcp or nixl")
        else:
            away = [h.name for h in hosts.values() if h.engines and h.address != store_host.address]
            if away:
                raise fail("transport", f"shm moves KV within one host only, and hosts {', '.join(away)} run "
                                        f"engines away from the store's host {store_host.name}: use tcp or nixl")
    outside = [h for h in hosts.values() if not h.loopback]
    if outside and not keys:
        raise fail("keys", f"hosts.{outside[0].name}.address {outside[0].address} is not loopback, and a process "
                           f"binds another address only with authentication: set `keys: DIR` (`kvrelay keys DIR` "
                           f"writes one; copy it to every host)")


def _check_event_ports(hosts: dict[str, HostSpec], fail) -> None:
    """With a store on every host, each store's KV-event ports (events_port and the next) are free on its
    host's address: no other port of any host on that address (loopback hosts share one)."""
    used = {(h.address, port): f"hosts.{h.name}.{what}" for h in hosts.values() for port, what in _ports(h)}
    for h in hosts.values():
        if h.store is None:
            continue
        for port, what in ((h.store["events_port"], "its KV events"), (h.store["events_port"] + 1, "their replay")):
            other = used.get((h.address, port))
            if other is not None:
                raise fail(f"hosts.{h.name}.store.events_port", f"{h.address}:{port} ({what}) is also {other}: "
                                                                f"give `events_port` a port whose next one is free too "
                                                                f"(default: the store's port + 1)")
            used[(h.address, port)] = f"hosts.{h.name}.store.events_port"


# ---- this host ------------------------------------------------------------------------------------
