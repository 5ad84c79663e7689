"""The vLLM connector's scheduler side with a router's prefix hint (a store on every host, issue 23): a request
the router sends to a decode alone, saying that a store holds its prompt's prefix, is offered the whole chunks of
that prefix as external tokens, loaded from the store named (its own or one of its ``peer_stores``); a store it
does not know, a hint already covered by vLLM's own cache, or no hint at all offer nothing.  The worker side's
pull from the named store is tests/vllm/test_vllm_peer_stores.py's (the same `LoadSpec`)."""

from __future__ import annotations

from kvrelay.engines.vllm.config import RelayConfig
from kvrelay.engines.vllm.scheduler import SchedulerSide
from kvrelay.params import PREFIX_STORE, PREFIX_TOKENS, RELAY_ID

MODEL = "vllm-prefix-hint-model"
OWN, FAR, OTHER = "tcp://127.0.0.1:5611", "tcp://127.0.0.1:5612", "tcp://127.0.0.1:5613"
LAYERS, HEADS, BLOCK, N = 2, 2, 32, 600
PROMPT = list(range(7, 7 + N))
BLOCKS = list(range(2, 2 + -(-N // BLOCK)))


class _Alive:
    def ping(self) -> None:
        pass


def _sched() -> SchedulerSide:
    cfg = RelayConfig.parse("kv_both", {"store": OWN, "peer_stores": [FAR], "remote_transport": "tcp",
                                        "prefix_lookup": False}, "recompute", MODEL, BLOCK)
    assert cfg.chunk_tokens == 256
    return SchedulerSide(cfg, "compat", LAYERS, HEADS, BLOCK, _Alive)  # type: ignore[arg-type]


def _hint(store: str, tokens: int, rid: str) -> dict:
    return {PREFIX_STORE: store, PREFIX_TOKENS: tokens, RELAY_ID: rid}


def test_a_hinted_prefix_is_loaded_from_the_store_named():
    sched = _sched()
    cases = {"far": (_hint(FAR, 560, "r1"), 0, 512), "own": (_hint("", 300, "r2"), 0, 256),
             "cached": (_hint(FAR, 560, "r3"), 512, 0),  # vLLM's own cache holds it all already
             "partly": (_hint(FAR, 560, "r4"), 256, 256)}
    for req_id, (params, computed, want) in cases.items():
        offer, is_async = sched.matched_tokens(req_id, PROMPT, params, computed)
        assert (offer, is_async) == (want, want > 0), req_id
        if offer:
            sched.after_alloc(req_id, BLOCKS, offer)
    loads = {spec.req_id: spec for spec in sched.build_meta([], lambda rid: BLOCKS).loads}
    assert set(loads) == {"far", "own", "partly"}
    assert (loads["far"].store, loads["far"].num_tokens, loads["far"].skip_tokens) == (FAR, 512, 0)
    assert (loads["own"].store, loads["own"].num_tokens) == ("", 256)
    assert (loads["partly"].store, loads["partly"].num_tokens, loads["partly"].skip_tokens) == (FAR, 512, 256)
    assert loads["far"].relay_id == "r1"


def test_no_usable_hint_offers_nothing():
    sched = _sched()
    for req_id, params in (("unknown-store", _hint(OTHER, 560, "r5")), ("less-than-a-chunk", _hint(FAR, 200, "r6")),
                           ("bad", {PREFIX_STORE: FAR, PREFIX_TOKENS: "512", RELAY_ID: "r7"}), ("none", {})):
        assert sched.matched_tokens(req_id, PROMPT, params, 0) == (0, False), req_id
    assert sched.build_meta([], lambda rid: BLOCKS).loads == []
