"""The store daemon's configuration: defaults < YAML file < environment (KVRELAY_STORE_*) < flags.

Owns: `StoreConfig` (validated on construction) and its loading.  Must not touch: anything it
configures.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from kvrelay.store.pool import ALIGN
from kvrelay.transfer import STORE_TRANSPORTS, check_store_transport

ENV_PREFIX = "KVRELAY_STORE_"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
KNOWN_TRANSPORTS = STORE_TRANSPORTS  # what the store serves (kvrelay/transfer/__init__.py says why not nvlink)


def parse_size(value: Any, what: str) -> int:
    """``123``, ``"64MiB"``, ``"2G"`` -> bytes (binary units)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ValueError(f"{what}: cannot parse size {value!r}; use bytes or a number with K/M/G/T, e.g. '1GiB'")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()[:1]])


@dataclass(slots=True)
class StoreConfig:
    host: str = "127.0.0.1"
    port: int = 5600  # control plane (ZMQ ROUTER); 0 picks a free port
    metrics_port: int = 0  # /metrics /healthz /readyz; 0 picks a free port, -1 disables
    pool_size: int = 1 << 30
    pool_name: str = ""  # /dev/shm name; default kvrelay-store-<port>
    max_chunk_bytes: int = 0  # 0: min(64 MiB, pool_size)
    ssd_dir: str = ""  # empty disables the SSD tier
    ssd_size: int = 16 << 30
    ssd_segment_size: int = 256 << 20
    ssd_direct: str = "auto"  # auto (measure at start), on, off
    ssd_fsync: bool = False  # fdatasync segments and journal after each spill (power-loss durability)
    transports: list[str] = field(default_factory=lambda: ["shm"])
    reserve_ttl: float = 60.0  # default time a reservation may stay uncommitted
    chunk_ttl: float = 0.0  # drop chunks not touched for this long (0: never)
    pull_pin_ttl: float = 30.0  # a pulled chunk stays pinned at most this long while the client copies
    eviction: str = "lru"
    # who re-hashes a committed slot before it is marked ready: "remote" (commits whose bytes crossed a
    # transport; a same-host publisher wrote the pool itself and every puller verifies end to end, and the
    # spiller checks each chunk before it reaches the SSD), "all", or "none"
    verify_commits: str = "remote"
    ready_file: str = ""  # written (control and metrics addresses) once the daemon serves
    # also serve same-host clients on a Unix socket (abstract namespace, named after the port): a round trip
    # there skips ZMQ's I/O threads (about 20 vs 160 us here); clients fall back to ZMQ without it
    local_socket: bool = True
    # publish where each ready in-memory chunk sits in a shared-memory directory (directory.py), so a
    # same-host client pulls it with no round trip (x86-64 only: its seqlock relies on ordered stores)
    directory: bool = True
    # the SSD spiller waits for a quiet control plane (no request for spill_quiet seconds) before writing a
    # chunk, but at most spill_max_delay seconds after its commit; spill_max_delay 0 writes at once
    spill_quiet: float = 0.05
    spill_max_delay: float = 2.0
    # tenants (tenants.py; a tenant is a request's cache_salt): "T=SIZE,...,*=SIZE" pool bytes a tenant may
    # hold (reserved + in memory), "T=SECONDS,..." idle TTL of its chunks (else chunk_ttl), metric labels
    tenant_quotas: str = ""
    tenant_ttls: str = ""
    max_tenant_labels: int = 64
    # encryption of the SSD tier (crypto.py): a key file of mode 0600, one "ID HEX" key a line, the last current
    at_rest_key: str = ""
    # append-only JSON lines: one per purge (time, who, tenant, chunks and bytes purged); empty: no audit log
    audit_log: str = ""
    # KV events (kvrelay.events, vLLM's wire format): the PUB endpoint ("" disables; tcp://127.0.0.1:0 picks a
    # port), its replay ROUTER (default: a free port on the same host), the consumer's block size, the topic
    events: str = ""
    events_replay: str = ""
    events_block_size: int = 16
    events_topic: str = ""

    def __post_init__(self) -> None:
        from kvrelay.security import check_loopback  # another address only with authentication on
        check_loopback(self.host, "store")
        if self.host in ("0.0.0.0", "::", ""):
            raise ValueError(f"host {self.host!r} binds every address, but the store tells its clients where to reach "
                             f"its transports by this address: give the one address other hosts reach it at")
        for name in ("port", "metrics_port"):
            v = getattr(self, name)
            if not -1 <= v <= 65535:
                raise ValueError(f"{name} {v} is outside 0..65535")
        for name in ("pool_size", "max_chunk_bytes", "ssd_size", "ssd_segment_size"):
            setattr(self, name, parse_size(getattr(self, name), name))
        if self.pool_size < ALIGN or self.pool_size % ALIGN:
            raise ValueError(f"pool_size {self.pool_size} must be a positive multiple of {ALIGN} bytes")
        if self.max_chunk_bytes == 0:
            self.max_chunk_bytes = min(64 << 20, self.pool_size)
        if not 0 < self.max_chunk_bytes <= self.pool_size:
            raise ValueError(f"max_chunk_bytes {self.max_chunk_bytes} must be in 1..pool_size ({self.pool_size})")
        if self.ssd_dir and self.ssd_segment_size > self.ssd_size:
            raise ValueError(f"ssd_segment_size {self.ssd_segment_size} exceeds ssd_size {self.ssd_size}")
        if self.ssd_dir and self.ssd_segment_size < self.max_chunk_bytes + 2 * ALIGN:
            raise ValueError(f"ssd_segment_size {self.ssd_segment_size} must hold a chunk of max_chunk_bytes "
                             f"({self.max_chunk_bytes}) plus {2 * ALIGN}; raise it or lower max_chunk_bytes")
        if self.ssd_direct not in ("auto", "on", "off"):
            raise ValueError(f"ssd_direct {self.ssd_direct!r}: choose auto, on or off")
        if isinstance(self.transports, str):
            self.transports = [t for t in self.transports.split(",") if t]
        if not self.transports:
            raise ValueError(f"transports is empty: choose from {', '.join(KNOWN_TRANSPORTS)}")
        for t in self.transports:
            check_store_transport(t, f"transports {self.transports}: transport")
        for name in ("reserve_ttl", "pull_pin_ttl"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.spill_quiet <= 60:
            raise ValueError(f"spill_quiet must be in (0, 60] seconds, got {self.spill_quiet}")
        if not 0 <= self.spill_max_delay <= 3600:
            raise ValueError(f"spill_max_delay must be in [0, 3600] seconds (0: spill at once), got "
                             f"{self.spill_max_delay}")
        if self.chunk_ttl < 0:
            raise ValueError(f"chunk_ttl must be >= 0 (0 disables), got {self.chunk_ttl}")
        if self.verify_commits not in ("remote", "all", "none"):
            raise ValueError(f"verify_commits {self.verify_commits!r}: choose remote, all or none")
        if self.eviction != "lru":
            raise ValueError(f"eviction policy {self.eviction!r} is not supported; use 'lru'")
        from kvrelay.store.tenants import parse_per_tenant
        parse_per_tenant(self.tenant_quotas, "tenant_quotas", lambda v: parse_size(v, "size"))
        parse_per_tenant(self.tenant_ttls, "tenant_ttls", float)
        if not 1 <= self.max_tenant_labels <= 10000:
            raise ValueError(f"max_tenant_labels must be in 1..10000, got {self.max_tenant_labels}")
        if self.events_block_size <= 0:
            raise ValueError(f"events_block_size must be positive (the KV-event consumer's block size), got "
                             f"{self.events_block_size}")
        if self.events and not self.events_replay:
            self.events_replay = self.events.rsplit(":", 1)[0] + ":0"
        if self.at_rest_key and not self.ssd_dir:
            raise ValueError("at_rest_key encrypts the SSD tier, and there is none: give ssd_dir too")
        if not self.pool_name:
            self.pool_name = f"kvrelay-store-0-{os.getpid()}" if self.port == 0 else \
                f"kvrelay-store-{self.port}"

    @classmethod
    def from_sources(cls, yaml_path: str | None = None, env: dict[str, str] | None = None,
                     overrides: dict[str, Any] | None = None) -> "StoreConfig":
        names = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        if yaml_path:
            data = _load_yaml(yaml_path)
            unknown = sorted(set(data) - set(names))
            if unknown:
                raise ValueError(f"{yaml_path}: unknown store options {unknown}; known: {sorted(names)}")
            for k, v in data.items():
                _check_type(k, v, str(names[k].type), yaml_path)
            values.update(data)
        for k, v in (os.environ if env is None else env).items():
            if k.startswith(ENV_PREFIX):
                name = k[len(ENV_PREFIX):].lower()
                if name not in names:
                    raise ValueError(f"environment variable {k}: unknown store option {name!r}")
                values[name] = _coerce(v, names[name].type, k)
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls(**values)


def _load_yaml(path: str) -> dict[str, Any]:
    """The mapping in YAML file ``path``; ValueError (one line: the file, and where it is malformed) otherwise."""
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise ValueError(f"--config {path}: cannot read it ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"--config {path}: malformed YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of store options, got {type(data).__name__}")
    return data


_SIZES = ("pool_size", "max_chunk_bytes", "ssd_size", "ssd_segment_size")  # ints that may also be '4GiB'


def _check_type(name: str, value: Any, typ: str, source: str) -> None:
    """ValueError naming option ``name`` from ``source`` unless ``value`` suits its declared type."""
    ok = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool) or (name in _SIZES and isinstance(v, str)),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "bool": lambda v: isinstance(v, bool),
          "str": lambda v: isinstance(v, str),
          "list[str]": lambda v: isinstance(v, str) or isinstance(v, list) and all(isinstance(x, str) for x in v),
          }.get(typ, lambda v: True)
    if not ok(value):
        raise ValueError(f"{source}: {name}: {value!r} is not a valid {typ}" +
                         (" (a size: bytes or e.g. '4GiB')" if name in _SIZES else ""))


def _coerce(raw: str, typ: Any, what: str) -> Any:
    t = str(typ)
    try:
        if t in ("int", "<class 'int'>"):
            return int(raw) if raw.strip().lstrip("-").isdigit() else raw  # sizes keep their units
        if t in ("float", "<class 'float'>"):
            return float(raw)
        if t in ("bool", "<class 'bool'>"):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
    except ValueError:
        raise ValueError(f"{what}={raw!r} is not a valid {t}") from None
    return raw


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of store options (keys as below, with underscores)")
    p.add_argument("--host", help="the address the store binds and gives clients for its transports (default "
                                   "127.0.0.1; another one only with --keys)")
    p.add_argument("--port", type=int)
    p.add_argument("--metrics-port", type=int)
    p.add_argument("--pool-size", help="host-memory pool, e.g. 4GiB")
    p.add_argument("--pool-name")
    p.add_argument("--max-chunk-bytes")
    p.add_argument("--ssd-dir", help="directory of the SSD tier (segments + journal); empty disables it")
    p.add_argument("--ssd-size")
    p.add_argument("--ssd-segment-size")
    p.add_argument("--ssd-direct", choices=["auto", "on", "off"])
    p.add_argument("--ssd-fsync", action="store_const", const=True)
    p.add_argument("--transports", help="comma-separated: shm,tcp,nixl (nvlink is engine to engine: it cannot carry the host pool)")
    p.add_argument("--reserve-ttl", type=float)
    p.add_argument("--chunk-ttl", type=float)
    p.add_argument("--pull-pin-ttl", type=float)
    p.add_argument("--eviction")
    p.add_argument("--verify-commits", choices=["remote", "all", "none"],
                   help="re-hash committed slots of remote publishers (default), of all, or of none")
    p.add_argument("--ready-file", help="write the daemon's addresses (JSON) here once it serves")
    p.add_argument("--spill-quiet", type=float,
                   help="control-plane silence (s) the spiller waits for before writing (default 0.05)")
    p.add_argument("--spill-max-delay", type=float,
                   help="longest wait (s) for a quiet control plane before a chunk is spilled (default 2; 0: at once)")
    p.add_argument("--no-local-socket", dest="local_socket", action="store_const", const=False,
                   help="serve the ZMQ socket only (by default same-host clients also get a Unix socket)")
    p.add_argument("--no-directory", dest="directory", action="store_const", const=False,
                   help="no shared directory of ready chunks: every same-host pull asks the daemon")
    p.add_argument("--tenant-quotas", help="pool bytes per tenant (cache_salt): 'T=SIZE,...' ('*=SIZE': every other)")
    p.add_argument("--tenant-ttls", help="idle TTL (s) of each tenant's chunks: 'T=SECONDS,...' (else --chunk-ttl)")
    p.add_argument("--max-tenant-labels", type=int, help="tenants with a metric label of their own (default 64)")
    p.add_argument("--at-rest-key", help="encrypt the SSD tier with the keys of this file (mode 0600; "
                                         "`kvrelay store keygen --at-rest-key FILE` makes one)")
    p.add_argument("--audit-log", help="append one JSON line per purge to this file")
    p.add_argument("--events", metavar="ENDPOINT",
                   help="publish KV events (vLLM's format) on this ZMQ PUB endpoint, e.g. tcp://127.0.0.1:0")
    p.add_argument("--events-replay", metavar="ENDPOINT", help="their replay socket (default: a free port)")
    p.add_argument("--events-block-size", type=int,
                   help="describe chunks in blocks of this many tokens: the consumer's block size (default 16)")
    p.add_argument("--events-topic", help="ZMQ topic of the KV events (default '')")


def from_args(args: argparse.Namespace) -> StoreConfig:
    over = {k: v for k, v in vars(args).items() if k != "config"}
    return StoreConfig.from_sources(args.config, overrides=over)
