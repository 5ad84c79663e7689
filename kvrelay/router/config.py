"""`RouterConfig`: everything `kvrelay router` is told, as one frozen value that checks itself.

The command line (server.py) parses its flags into a `RouterConfig`; the app (app.py) is built from one.
Every bad value is refused when the config is made, with a ValueError that names the flag as the user
typed it (``--retries -1: must be 0 (no retry) or more``), so the command line's one-line errors and exit
code 2 come from here.  What depends on the process rather than on the values (the keys, and so whether
a non-loopback ``--host`` is allowed) is checked by the command line.

Owns: the router's settings, their defaults and their validation.  Must not touch: sockets, the app, or
anything the settings are used for.
"""

from __future__ import annotations

import logging
import math
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from kvrelay.membership import check_cluster, check_endpoint
from kvrelay.router.balance import Balance
from kvrelay.router.cacheview import EventSource, parse_events
from kvrelay.router.policy import POLICIES, STORE, Disagg
from kvrelay.router.store import parse_prefill_stores

ADDRESS_EXAMPLES = {"--prefill": "http://127.0.0.1:8100", "--decode": "http://127.0.0.1:8200",
                    "--store": "tcp://127.0.0.1:5600 (the store's control address)"}


@dataclass(frozen=True, slots=True)
class RouterConfig:
    decode: tuple[str, ...]  # the decode workers' URLs (at least one)
    prefill: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8000  # 0 picks a free port
    policy: str = "least_loaded"
    store: str = ""  # the store's control address ("": no store watch)
    prefill_stores: tuple[str, ...] = ()  # URL=ADDR: the store each prefill publishes into (a store per host)
    health_interval: float = 2.0
    probe_interval: float = 0.2
    retries: int = 5
    retry_backoff: float = 0.05
    retry_backoff_max: float = 1.0
    breaker_failures: int = 10
    prefill_connections: int = 1000  # 0: no limit
    decode_connections: int = 1000
    prefill_drain: float = 30.0
    events: tuple[str, ...] = ()  # NAME=PUB[,REPLAY]
    tokenizer: str = ""
    overlap_weight: float = 1.0
    balance_abs: int = 4  # cache_aware's guard against herding (balance.py)
    balance_rel: float = 1.5
    route_temperature: float = 0.0
    request_tokens: int = 32
    engine_load: bool = False  # the health probe also reads each engine's /metrics (engineload.py)
    decode_only_below: int = 0
    decode_only_hit: float = 0.8
    store_skip: bool = False
    workers: int = 1  # router processes sharing the port
    reuse_port: bool = False  # a --workers child
    ready_file: str = ""
    log_level: str = "INFO"
    timeout: float = 600.0  # seconds a whole request may take on a worker
    etcd: str = ""  # follow the prefill/decode members registered in this etcd (kvrelay/router/members.py)
    cluster: str = "default"  # ... of this cluster

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port {self.port} is outside 0..65535 (0 picks a free port)")
        addresses: list[tuple[str, str, tuple[str, ...]]] = [("--prefill", u, ("http", "https")) for u in self.prefill]
        addresses += [("--decode", u, ("http", "https")) for u in self.decode]
        addresses += [("--store", self.store, ("tcp",))] if self.store else []
        for flag, address, schemes in addresses:
            if why := _bad_address(address, schemes):
                raise ValueError(f"{flag} {address!r}: {why}; give {schemes[0]}://HOST:PORT, e.g. "
                                 f"{ADDRESS_EXAMPLES[flag]}")
        if self.retries < 0:
            raise ValueError(f"--retries {self.retries}: must be 0 (no retry) or more")
        if self.breaker_failures < 1:
            raise ValueError(f"--breaker-failures {self.breaker_failures}: a worker needs at least 1 failure to go "
                             f"out of service")
        for flag, n in (("--prefill-connections", self.prefill_connections),
                        ("--decode-connections", self.decode_connections)):
            if n < 0:
                raise ValueError(f"{flag} {n}: must be 0 (no limit) or a positive number of connections")
        if not (math.isfinite(self.prefill_drain) and self.prefill_drain >= 0):
            raise ValueError(f"--prefill-drain {self.prefill_drain:g}: must be 0 (cancel at once) or a positive "
                             f"number of seconds")
        for flag, seconds in (("--retry-backoff", self.retry_backoff), ("--retry-backoff-max", self.retry_backoff_max),
                              ("--health-interval", self.health_interval),
                              ("--probe-interval", self.probe_interval)):
            if not (math.isfinite(seconds) and seconds > 0):
                raise ValueError(f"{flag} {seconds:g}: must be a positive number of seconds")
        if self.retry_backoff_max < self.retry_backoff:
            raise ValueError(f"--retry-backoff {self.retry_backoff:g} is above --retry-backoff-max "
                             f"{self.retry_backoff_max:g}: the first wait's cap must be at most the longest wait")
        if not 1 <= self.workers <= 64:
            raise ValueError(f"--workers {self.workers}: give 1 to 64 router processes")
        if self.ready_file and not Path(self.ready_file).parent.is_dir():
            raise ValueError(f"--ready-file {self.ready_file!r}: the directory "
                             f"{str(Path(self.ready_file).parent)!r} does not exist")
        if not isinstance(logging.getLevelName(self.log_level.upper()), int):
            raise ValueError(f"--log-level {self.log_level!r}: choose DEBUG, INFO, WARNING or ERROR")
        if self.etcd:
            check_endpoint(self.etcd, "--etcd")
            check_cluster(self.cluster)
        elif not self.decode:
            raise ValueError("at least one --decode URL is needed (or --etcd URL: the decode workers registered "
                             "there)")
        if self.policy not in POLICIES:
            raise ValueError(f"--policy {self.policy!r}: choose one of {', '.join(POLICIES)}")
        self.event_sources()  # each --events names a worker or the store, at tcp:// endpoints
        parse_prefill_stores(self.prefill_stores, self.prefill)
        if self.tokenizer and not Path(self.tokenizer).is_dir():
            raise ValueError(f"--tokenizer {self.tokenizer!r} is not a directory (give the engines' checkpoint)")
        self.disagg()
        self.balance()
        if not (math.isfinite(self.overlap_weight) and self.overlap_weight >= 0):
            raise ValueError(f"--overlap-weight {self.overlap_weight:g}: must be a non-negative number")

    def event_sources(self) -> list[EventSource]:
        """The KV event publishers of ``--events``; ValueError naming a bad one."""
        names = {u.rstrip("/") for u in self.prefill + self.decode} | {STORE}
        return [parse_events(spec, names) for spec in self.events]

    def disagg(self) -> Disagg:
        """The conditional disaggregation thresholds (``--decode-only-*``, ``--store-skip``)."""
        return Disagg(self.decode_only_below, self.decode_only_hit, self.store_skip)

    def balance(self) -> Balance:
        """cache_aware's guard against herding and its temperature (``--balance-*``, ``--route-temperature``,
        ``--request-tokens``)."""
        return Balance(self.balance_abs, self.balance_rel, self.route_temperature, self.request_tokens)

    @property
    def reads_cache(self) -> bool:
        """Whether the router keeps a view of the workers' caches (events, a tokenizer, or cache_aware)."""
        return bool(self.events or self.tokenizer or self.policy == "cache_aware")


def _bad_address(address: str, schemes: tuple[str, ...]) -> str:
    """Why ``address`` is not SCHEME://HOST:PORT with one of ``schemes`` ("" if it is)."""
    try:
        parts = urllib.parse.urlsplit(address)
        port = parts.port
    except ValueError as exc:  # a port that is not a number, or out of range
        return str(exc)
    if parts.scheme not in schemes:
        return f"the scheme must be {' or '.join(s + '://' for s in schemes)}"
    if not parts.hostname:
        return "no host"
    if port is None:
        return "no port"
    if port == 0:
        return "port 0 is not a port to connect to"
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username is not None:
        return "nothing may follow host:port"
    return ""
