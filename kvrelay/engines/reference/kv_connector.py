"""Wiring of the P/D hooks: build the store client and the `kvrelay.connector` publisher (prefill) or
puller (decode) for a reference engine, behind a circuit breaker on the store: after the store failed once,
a prefill answers without publishing and a decode recomputes at once, until a background ping (every
``breaker_cooldown_s``) finds the store back.  With a store on every host, a decode also pulls from the
other hosts' stores it is given (``peers``, over ``remote_transport``).

Owns: `make_hooks()`.  Must not touch: the hooks' internals.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvrelay.connector import CircuitBreaker, LayerPublisher, LayerPuller
from kvrelay.engines.reference.config import EngineConfig, ModelConfig
from kvrelay.engines.reference.model import make_layout


def make_hooks(role: str, mcfg: ModelConfig, ecfg: EngineConfig, store: str, transport: str,
               layerwise: bool = True, name: str | None = None, breaker_cooldown_s: float = 0.5,
               peers: Sequence[str] = (), remote_transport: str = "tcp", keep_copies: bool = False
               ) -> tuple[LayerPublisher | None, LayerPuller | None]:
    """``peers``: other hosts' stores a decode may pull from (a store per host), over ``remote_transport``;
    ``keep_copies``: what it pulls from them is kept in its own store too (kvrelay.connector.localcopy)."""
    if role not in ("prefill", "decode"):
        raise ValueError(f"role {role!r} has no KV hooks (choose prefill or decode)")
    from kvrelay.store.client import StoreClient
    compat = make_layout(mcfg, ecfg.num_blocks, ecfg.block_size, ecfg.dtype).compat_hash(mcfg.model_id)
    client = StoreClient(store, transport=transport, compat_hash=compat, name=name or f"engine-{role}",
                         staging_bytes=64 << 20)
    # the probe pings on a link of its own thread (a restarted daemon is introduced to it), closed after
    breaker = CircuitBreaker(f"kvrelay store {store} ({role})", breaker_cooldown_s, probe=client.probe)
    if role == "prefill":
        return LayerPublisher(client, store, transport, chunk_tokens=ecfg.chunk_tokens, layerwise=layerwise,
                              breaker=breaker), None
    def peer(address: str) -> StoreClient:
        return StoreClient(address, transport=remote_transport, compat_hash=compat, name=name or f"engine-{role}",
                           staging_bytes=64 << 20)
    return None, LayerPuller(client, store, breaker=breaker, peers=peers, make=peer, keep_copies=keep_copies)
