"""This host's part of a cluster file (`kvrelay up -f cluster.yaml`): which host this machine is, and the
processes it runs.

Owns: finding this machine's host (``--host NAME``, or the one host whose address is local) and the per-host
plan (a hostplan.HostPlan: the `kvrelay` subcommands to run, in order, their flags, and the environment they
get), with the checks only the host that runs it can make (its key directory, its vLLM and checkpoint).
Must not touch: reading and validating the file (cluster.py), starting or supervising the processes
(launcher.py, supervisor.py) or what they do.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import re
import socket
from pathlib import Path

from kvrelay.cluster import ClusterError, ClusterSpec, EngineSpec, HostSpec, _store_address, _url_host
from kvrelay.hostplan import Arg, HostPlan, Launch, VllmSpec


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
    if host.engine == "reference" and spec.checkpoint and not Path(spec.checkpoint).is_dir():
        raise ClusterError(f"{spec.source}: model.checkpoint: {spec.checkpoint} is not a directory on this host "
                           f"({host.name}): every host needs its own copy")
    if host.engine == "vllm" and host.engines:
        _check_vllm(spec, host)
    addr = host.address
    store_host = spec.store_of(host)
    store_address = _store_address(store_host)
    model = ["--checkpoint", spec.checkpoint] if spec.checkpoint else []
    procs: list[tuple[str, Launch]] = []
    if host.store is not None:
        s = host.store
        remote = sorted({spec.transport} - {"shm"})
        args: list[Arg] = ["store", "--host", addr, "--port", str(s["port"]), "--metrics-port", "0", "--pool-name",
                           pool_name, "--transports", ",".join(["shm", *remote])]
        if "pool_size" in s:
            args += ["--pool-size", str(s["pool_size"])]
        if spec.per_host:  # its KV events, on its host's address: the router follows every store's
            pub, replay = _events_of(host)
            args += ["--events", pub, "--events-replay", replay]
        args += _register(spec, host, "store")
        ssd = s.get("ssd_dir", str(workdir / "ssd"))
        if ssd and ssd != "none":
            args += ["--ssd-dir", str(ssd)]
        procs.append(("store", args))
    counts = {"prefill": 0, "decode": 0}
    cores = sorted(os.sched_getaffinity(0))
    # hosts on one address share a machine (a cluster on loopback): each vLLM server pins its OpenMP threads to
    # a core, so this host's take the cores after those of the hosts listed before it (two vLLM workers pinned
    # to one core stalled each other here: a prefill's step waited up to a minute while a decode spun)
    first = sum(e.tp for h in itertools.takewhile(lambda h: h is not host, spec.hosts.values())
                if h.engine == "vllm" and h.address == host.address for e in h.engines)
    events: list[str] = []  # the router's --events of this host's vLLM servers
    slices = head_slices(spec)
    for e in host.engines:
        transport = "shm" if host.address == store_host.address else spec.transport
        name = f"{e.role}{counts[e.role]}"
        counts[e.role] += 1
        if host.engine == "vllm":  # a core per rank, after the cores of the servers before it
            core = "|".join(str(cores[(first + k) % len(cores)]) for k in range(e.tp))
            first += e.tp
            procs.append((name, _vllm(spec, host, e, transport, core if e.tp > 1 else int(core), workdir, name,
                                      slices)))
            if host.router_port is not None:  # ipc:// reaches this host only
                pub = f"ipc://{workdir.resolve()}/{name}.kv"
                events.append(f"http://{_url_host(addr)}:{e.port}={pub},{pub}.replay")
            continue
        args = ["engine", "--role", e.role, "--host", addr, "--port", str(e.port), *model, "--store",
                store_address, "--transport", transport, "--block-size", str(e.block_size)]
        if e.threads:
            args += ["--threads", str(e.threads)]
        args += _register(spec, host, name)
        if spec.per_host and e.role == "decode":  # it pulls a chunk from the store that holds it: its prefill's
            args += ["--remote-transport", spec.transport]
            for peer in spec.stores:
                if peer != store_address:
                    args += ["--peer-store", peer]
            if e.keep_remote_prefix:
                args += ["--keep-remote-prefix"]
        procs.append((name, args))
    if host.router_port is not None:
        args = ["router", "--host", addr, "--port", str(host.router_port)]
        if spec.etcd:  # the reference engines registered there join it (and leave when their lease ends)
            args += ["--etcd", spec.etcd]
        if not spec.per_host:
            args += ["--store", spec.store_address]
        for url in _static(spec, "prefill"):
            args += ["--prefill", url]
        for url, store in spec.prefill_stores() if spec.per_host else ():  # the store each prefill publishes into
            args += ["--prefill-store", f"{url}={store}"]
        for url in _static(spec, "decode"):
            args += ["--decode", url]
        for source in events:
            args += ["--events", source]
        for h in spec.hosts.values() if spec.per_host else ():  # every store's, under its control address
            if h.store is not None:
                args += ["--events", f"{_store_address(h)}={','.join(_events_of(h))}"]
        procs.append(("router", args))
    env = {**spec.env, **host.env}
    if spec.keys:
        env.setdefault("KVRELAY_KEYS", spec.keys)
    if spec.transport == "nixl" and "UCX_NET_DEVICES" not in env and not host.loopback:
        device = interface_of(addr)
        if device:
            env["UCX_NET_DEVICES"] = device
    return HostPlan(procs, env, store_address, remote_store=host.store is None and bool(host.engines),
                    heading=f"host {host.name} ({host.address}) of {spec.source}; ")


def _events_of(host: HostSpec) -> tuple[str, str]:
    """Where the store of ``host`` publishes its KV events, and their replay socket (cluster.py's events_port)."""
    assert host.store is not None
    port = host.store["events_port"]
    return f"tcp://{_url_host(host.address)}:{port}", f"tcp://{_url_host(host.address)}:{port + 1}"


def _register(spec: ClusterSpec, host: HostSpec, name: str) -> list[Arg]:
    """With ``etcd:``, the flags that register a store or reference engine as HOST-NAME."""
    return ["--etcd", spec.etcd, "--name", re.sub(r"[^A-Za-z0-9._-]", "-", f"{host.name}-{name}")] if spec.etcd else []


def _static(spec: ClusterSpec, role: str) -> list[str]:
    """The router's fixed --prefill/--decode list: every engine of the file, but with ``etcd:`` only those that
    do not register (vLLM servers; and prefills with a store per host, whose stores the router must know)."""
    if not spec.etcd:
        return spec.urls(role)
    return [f"http://{_url_host(h.address)}:{e.port}" for h in spec.hosts.values() for e in h.engines
            if e.role == role and (h.engine != "reference" or (role == "prefill" and spec.per_host))]


def head_slices(spec: ClusterSpec) -> int:
    """The KV head cut every vLLM server of the cluster publishes and pulls in (kvrelay.connector.heads): 0 (each
    server's default) where all run at TP 1, else the least common multiple of each server's ranks that hold
    heads of their own (min(TP, KV heads)), which divides the KV head count: every rank then publishes whole
    slices and every decode rank pulls only the heads it keeps.  The KV head count is the checkpoint's
    (config.json: num_key_value_heads, else num_attention_heads); unreadable, 0."""
    tps = {e.tp for h in spec.hosts.values() if h.engine == "vllm" for e in h.engines}
    if tps <= {1}:
        return 0
    heads = set()
    for h in spec.hosts.values():
        if h.engine == "vllm" and h.engines and h.checkpoint:
            try:
                cfg = json.loads((Path(h.checkpoint) / "config.json").read_text())
                heads.add(int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]))
            except (OSError, ValueError, KeyError, TypeError):
                return 0
    if len(heads) != 1:
        return 0
    total = heads.pop()
    return functools.reduce(math.lcm, (min(tp, total) for tp in tps), 1)


def _vllm(spec: ClusterSpec, host: HostSpec, e: EngineSpec, transport: str, core: int | str, workdir: Path,
          name: str, slices: int = 0) -> VllmSpec:
    """A vLLM server of ``host`` on its address, with the kvrelay connector, on its own core; publishing its KV
    events on a unix socket in the work dir when this host runs the router (the only one that can follow it)."""
    from kvrelay.engines.vllm.config import VLLM_CONNECTOR
    from kvrelay.localplan import served_name
    assert host.checkpoint is not None  # parse() refuses a vllm host without one
    events = f"ipc://{workdir.resolve()}/{name}.kv" if host.router_port is not None else None
    own = _store_address(spec.store_of(host))
    peers = tuple(s for s in spec.stores if s != own) if spec.per_host and e.role == "decode" else ()
    return VllmSpec(host.checkpoint, served_name(host.checkpoint), e.block_size, 1.0, core, VLLM_CONNECTOR,
                    transport, 600.0, host=host.address, port=e.port, kv_events=events, peer_stores=peers,
                    remote_transport=spec.transport, tensor_parallel_size=e.tp, head_slices=slices)


def _check_vllm(spec: ClusterSpec, host: HostSpec) -> None:
    """What a host that runs vLLM engines needs here: its checkpoint directory and vLLM itself."""
    from kvrelay.engines.vllm.process import setup_problem
    assert host.checkpoint is not None  # parse() refuses a vllm host without one
    problem = setup_problem(host.checkpoint)
    if problem is None:
        return
    if "config.json" in problem:
        where = f"hosts.{host.name}.checkpoint" if host.checkpoint != spec.checkpoint else "model.checkpoint"
        raise ClusterError(f"{spec.source}: {where}: {problem} (on this host, {host.name}: every host needs its "
                           f"own copy)")
    raise ClusterError(f"{spec.source}: hosts.{host.name}.engine: vllm: {problem}")


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
