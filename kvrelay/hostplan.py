"""What one host of a `kvrelay up` runs: `HostPlan`, the one form both ways of starting a cluster produce.

`kvrelay up -f cluster.yaml` plans one host of a file (cluster.py reads it, clusterplan.py plans the host:
fixed ports, literal addresses); `kvrelay up` alone generates a one-host plan from its flags (localplan.py:
ports picked at start-up).  An address that is known only once a process of this host is ready (the store's
``--port 0``, an engine's URL) is a `Ref` to that process's ready file; the launcher resolves it when it
starts the process that needs it.

Owns: the plan's types and resolving its `Ref`s.  Must not touch: reading cluster files (cluster.py),
starting or supervising anything (launcher.py, supervisor.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Ref:
    """``field`` of the ready file of the process ``process`` of this host (e.g. the store's ``address``)."""

    process: str
    field: str

    def resolve(self, ready: dict[str, dict[str, Any]]) -> str:
        info = ready.get(self.process)
        if info is None or not info.get(self.field):
            raise RuntimeError(f"the plan needs {self.process}'s {self.field}, and {self.process} is not ready "
                               f"(a plan starts a process after those it refers to)")
        return str(info[self.field])


@dataclass(frozen=True, slots=True)
class Join:
    """One argument made of literal text and `Ref`s (e.g. the router's ``--events URL=PUB,REPLAY`` of an engine)."""

    parts: tuple["str | Ref", ...]

    def resolve(self, ready: dict[str, dict[str, Any]]) -> str:
        return "".join(p.resolve(ready) if isinstance(p, Ref) else p for p in self.parts)


Arg = str | Ref | Join


@dataclass(frozen=True, slots=True)
class VllmSpec:
    """A vLLM OpenAI server of the cluster (an engine: spawned with the others, then waited for), started
    from ``checkpoint`` under the served name ``name``.  ``connector``: the kvrelay connector class (its
    ``--kv-transfer-config`` reaches the plan's store over ``transport``); None: a plain server.  It listens on
    ``host``:``port`` (0: a free port picked at start-up); ``kv_events``: it publishes vLLM's KV events at this
    ``ipc://`` endpoint (its replay socket beside it), None: no events.  ``peer_stores``: with a store on every
    host, the other hosts' stores it pulls from over ``remote_transport``.  ``tensor_parallel_size`` N: N ranks,
    ``cpu_core`` then names a core per rank ("0|1"); ``head_slices``: the cluster's KV head cut (the connector's
    ``head_slices``; 0: its default)."""

    checkpoint: str
    name: str
    block_size: int
    kv_cache_gib: float
    cpu_core: int | str
    connector: str | None
    transport: str
    start_timeout: float
    host: str = "127.0.0.1"
    port: int = 0
    kv_events: str | None = None
    peer_stores: tuple[str, ...] = ()  # a store on every host: the other hosts' stores this decode may pull from
    remote_transport: str = "tcp"
    tensor_parallel_size: int = 1
    head_slices: int = 0


Launch = list[Arg] | VllmSpec  # a `kvrelay` subcommand and its flags, or a vLLM server


def resolve(argv: list[Arg], ready: dict[str, dict[str, Any]]) -> list[str]:
    """``argv`` with each `Ref` replaced by the address it names."""
    return [a if isinstance(a, str) else a.resolve(ready) for a in argv]


def is_engine(launch: Launch) -> bool:
    """An engine (started together with the host's other engines, after its store and before its router)."""
    return isinstance(launch, VllmSpec) or launch[0] == "engine"


@dataclass(slots=True)
class HostPlan:
    """What `kvrelay up` runs on one host: ``(name, launch)`` in start order (store, engines, router), and the
    extra environment of every process.  ``remote_store``: the engines here use a store on another host, so
    the launcher waits until it answers before starting them (a store client needs its store at start-up).

    How the launcher shows it: ``heading`` (before "logs in WORKDIR"), ``labels`` (a process's name on its
    line, default its name) and ``detailed`` (the store's metrics and events, the router's endpoints)."""

    processes: list[tuple[str, Launch]]
    env: dict[str, str]
    store_address: Arg
    remote_store: bool
    heading: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    detailed: bool = False
