"""`RelayConfig`: kvrelay's settings inside vLLM, read from ``--kv-transfer-config``.

    {"kv_connector": "KVRelayConnector", "kv_connector_module_path": "kvrelay.engines.vllm",
     "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
     "kv_connector_extra_config": {"store": "tcp://127.0.0.1:5600", "transport": "shm", "chunk_tokens": 256,
                                   "failure_policy": "recompute", "pull_timeout_s": 30, "model_id": "...",
                                   "keys": "/path/to/keys"}}

``keys`` (a directory written by `kvrelay keys`; default $KVRELAY_KEYS) authenticates the store's planes; it
is made this process's keys (kvrelay.security.configure) when the configuration is parsed.

Owns: that configuration, both ways: `vllm_kv_transfer_config` writes it for the servers kvrelay starts
(`kvrelay up --engine vllm`, the benches, the tests), and `RelayConfig.parse` reads and validates it inside
vLLM: every bad or missing value is refused at start-up with a message that names it.  Must not touch:
vLLM's state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvrelay import security
from kvrelay.keys import DEFAULT_CHUNK_TOKENS
from kvrelay.transfer import STORE_TRANSPORTS

ROLES = ("kv_producer", "kv_consumer", "kv_both")
POLICIES = ("recompute", "fail")
TRANSPORTS = STORE_TRANSPORTS  # the engines reach each other through the store
KEYS = ("store", "transport", "chunk_tokens", "failure_policy", "pull_timeout_s", "model_id", "prefix_lookup",
        "reserve_ttl_s", "breaker_cooldown_s", "keys", "peer_stores", "remote_transport", "head_slices",
        "store_timeout_s")


VLLM_CONNECTOR = "KVRelayConnector"  # the connector class in this package, as vLLM's kv_connector names it


def vllm_kv_transfer_config(store_address: str, transport: str, connector: str | None = VLLM_CONNECTOR,
                            peer_stores: tuple[str, ...] = (), remote_transport: str = "tcp", head_slices: int = 0
                            ) -> dict[str, Any] | None:
    """``--kv-transfer-config`` of the vLLM prefill and decode servers (both kv_both: the router's
    kv_transfer_params say which leg a request is).  ``connector=None``: none at all (vLLM refuses a
    config without a connector), for trying the cluster with plain servers.  ``peer_stores``: a store on every
    host: the other hosts' stores a decode may pull from, over ``remote_transport``."""
    if connector is None:
        return None
    return {"kv_connector": connector, "kv_connector_module_path": "kvrelay.engines.vllm", "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"store": store_address, "transport": transport,
                                          **({"peer_stores": list(peer_stores), "remote_transport": remote_transport}
                                             if peer_stores else {}),
                                          **({"head_slices": head_slices} if head_slices else {}),
                                          **({"keys": str(keys.directory)} if (keys := security.current()) else {})}}


class ConfigError(ValueError):
    """A bad kvrelay setting in vLLM's --kv-transfer-config."""


@dataclass(frozen=True, slots=True)
class RelayConfig:
    role: str  # kv_producer: publishes; kv_consumer: loads; kv_both: both
    store: str  # the kvrelay store's control address, tcp://HOST:PORT
    transport: str = "shm"
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    failure_policy: str = "recompute"
    pull_timeout_s: float = 30.0
    model_id: str = ""  # default: vLLM's --model (both sides must name the model alike)
    prefix_lookup: bool = True  # look every new request's prompt up in the store (cross-instance prefix reuse)
    reserve_ttl_s: float = 120.0
    breaker_cooldown_s: float = 1.0  # after the store failed: skip it this long, then probe again
    store_timeout_s: float = 5.0  # one store round trip; a dead store opens the circuit breaker after one of these
    keys: str = ""  # key directory (kvrelay.security); "" : $KVRELAY_KEYS or none
    peer_stores: tuple[str, ...] = ()  # a store on every host: the others a decode may pull from (its prefill's)
    remote_transport: str = "tcp"  # ... over this
    head_slices: int = 0  # the KV heads cut into this many chunks (kvrelay.connector.heads); 0: min(TP size, heads)

    @property
    def publishes(self) -> bool:
        return self.role in ("kv_producer", "kv_both")

    @property
    def loads(self) -> bool:
        return self.role in ("kv_consumer", "kv_both")

    @classmethod
    def parse(cls, role: str | None, extra: dict[str, Any] | None, vllm_policy: str, default_model_id: str,
              block_size: int) -> "RelayConfig":
        where = "--kv-transfer-config"
        if role not in ROLES:
            raise ConfigError(f"{where}: kv_role {role!r} is not supported by KVRelayConnector; choose one of "
                              f"{', '.join(ROLES)}")
        extra = dict(extra or {})
        unknown = sorted(set(extra) - set(KEYS))
        if unknown:
            raise ConfigError(f"{where}: kv_connector_extra_config has unknown keys {unknown}; known: {list(KEYS)}")
        store = extra.get("store")
        if not isinstance(store, str) or not store.startswith("tcp://") or ":" not in store[6:]:
            raise ConfigError(f"{where}: kv_connector_extra_config.store must be the kvrelay store's address like "
                              f"\"tcp://127.0.0.1:5600\" (start one with `kvrelay store`), got {store!r}")
        transport = extra.get("transport", "shm")
        if transport not in TRANSPORTS:
            raise ConfigError(f"{where}: kv_connector_extra_config.transport {transport!r}: choose one of "
                              f"{', '.join(TRANSPORTS)}")
        chunk = extra.get("chunk_tokens", DEFAULT_CHUNK_TOKENS)
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0 or chunk % block_size:
            raise ConfigError(f"{where}: kv_connector_extra_config.chunk_tokens must be a positive multiple of "
                              f"vLLM's block size {block_size}, got {chunk!r} (every server of a cluster must use "
                              f"the same chunk_tokens)")
        policy = extra.get("failure_policy", vllm_policy)
        if policy not in POLICIES:
            raise ConfigError(f"{where}: kv_connector_extra_config.failure_policy {policy!r}: choose recompute or "
                              f"fail")
        if policy != vllm_policy:
            raise ConfigError(f"{where}: kv_connector_extra_config.failure_policy is {policy!r} but vLLM's "
                              f"kv_load_failure_policy is {vllm_policy!r}; set \"kv_load_failure_policy\": "
                              f"\"{policy}\" in --kv-transfer-config (vLLM applies it)")
        numbers = {}
        for key, default in (("pull_timeout_s", 30.0), ("reserve_ttl_s", 120.0), ("breaker_cooldown_s", 1.0),
                             ("store_timeout_s", 5.0)):
            value = extra.get(key, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86400:
                raise ConfigError(f"{where}: kv_connector_extra_config.{key} must be a number of seconds in "
                                  f"(0, 86400], got {value!r}")
            numbers[key] = float(value)
        model_id = extra.get("model_id", default_model_id)
        if not isinstance(model_id, str) or not model_id:
            raise ConfigError(f"{where}: kv_connector_extra_config.model_id must be a non-empty string, got "
                              f"{model_id!r}")
        lookup = extra.get("prefix_lookup", True)
        if not isinstance(lookup, bool):
            raise ConfigError(f"{where}: kv_connector_extra_config.prefix_lookup must be true or false, got "
                              f"{lookup!r}")
        keys = extra.get("keys", "")
        if not isinstance(keys, str):
            raise ConfigError(f"{where}: kv_connector_extra_config.keys must be a key directory (a string), got "
                              f"{keys!r}")
        try:
            configured = security.configure(keys or None)
        except security.KeysError as exc:
            raise ConfigError(f"{where}: kv_connector_extra_config.keys: {exc}") from None
        peers = extra.get("peer_stores", [])
        if not isinstance(peers, list) or not all(isinstance(p, str) and p.startswith("tcp://") for p in peers):
            raise ConfigError(f"{where}: kv_connector_extra_config.peer_stores must be a list of store addresses like "
                              f"\"tcp://198.18.0.2:5600\" (the other hosts' stores), got {peers!r}")
        remote = extra.get("remote_transport", "tcp")
        if remote not in ("tcp", "nixl"):
            raise ConfigError(f"{where}: kv_connector_extra_config.remote_transport {remote!r}: another host's store "
                              f"is reached over tcp or nixl")
        slices = extra.get("head_slices", 0)
        if isinstance(slices, bool) or not isinstance(slices, int) or slices < 0:
            raise ConfigError(f"{where}: kv_connector_extra_config.head_slices must be a positive number of head "
                              f"ranges (the same on every server of a cluster whose tensor-parallel sizes differ), "
                              f"got {slices!r}")
        return cls(role=role, store=store, transport=transport, chunk_tokens=chunk, failure_policy=policy,
                   model_id=model_id, prefix_lookup=lookup, keys=str(configured.directory) if configured else "",
                   peer_stores=tuple(peers), remote_transport=remote, head_slices=slices, **numbers)
