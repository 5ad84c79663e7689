"""Tensor parallelism in the vLLM connector without a vLLM server: which head slices a server publishes at its
TP size (refused at start-up, naming the shapes, where they cannot serve it), the scheduler's lookups of every
slice, and the slices a decode leg's load expects (its prefill's, when its params say so)."""

from __future__ import annotations

import pytest

from kvrelay.engines.vllm.config import ConfigError, RelayConfig
from kvrelay.engines.vllm.scheduler import SchedulerSide
from kvrelay.keys import ChunkKey
from kvrelay.params import DO_REMOTE_DECODE, DO_REMOTE_PREFILL, RELAY_ID
from vllm_helpers import require_vllm

LAYERS, HEADS, BLOCK, CHUNK = 2, 4, 16, 32
PROMPT = list(range(100, 100 + 3 * CHUNK))


def test_head_slices_at_each_tp_size_or_a_start_up_error_naming_the_shapes():
    require_vllm()
    from kvrelay.engines.vllm.connector import _head_slices
    assert _head_slices(0, HEADS, 1, False).slices == 1  # TP 1: whole chunks, as before
    assert _head_slices(0, HEADS, 2, False).slices == 2  # one per rank
    assert _head_slices(4, HEADS, 2, False).slices == 4  # the cluster's (a TP 4 peer)
    assert _head_slices(0, 1, 2, False).slices == 1  # one KV head at TP 2: replicated, published once
    assert _head_slices(0, 1, 4, True).slices == 1  # MLA's latent cache, the same on every rank
    with pytest.raises(ConfigError, match=r"head_slices 1 cannot serve 4 KV heads at tensor-parallel size 2.*multiple"):
        _head_slices(1, HEADS, 2, False)
    with pytest.raises(ConfigError, match=r"head_slices 3 cannot serve 4 KV heads.*divide"):
        _head_slices(3, HEADS, 1, False)
    with pytest.raises(ConfigError, match=r"6 KV heads at tensor-parallel size 4.*evenly"):
        _head_slices(0, 6, 4, False)


class _Store:
    """The scheduler's store client: holds ``present`` keys; records what was looked up."""

    def __init__(self, present: set[ChunkKey]) -> None:
        self.present, self.asked = present, []

    def lookup(self, keys: list[ChunkKey], tenant: str = "") -> int:
        self.asked.append(keys)
        n = 0
        for k in keys:
            if k not in self.present:
                break
            n += 1
        return n

    def ping(self) -> None:
        pass

    def close(self) -> None:
        pass


def _sched(store: _Store, slices: int) -> SchedulerSide:
    cfg = RelayConfig.parse("kv_both", {"store": "tcp://127.0.0.1:5600", "chunk_tokens": CHUNK}, "recompute", "m",
                            BLOCK)
    return SchedulerSide(cfg, "compat", LAYERS, HEADS, BLOCK, lambda: store, slices)  # type: ignore[arg-type,return-value]


def test_a_prefix_is_found_only_when_every_head_slice_of_every_layer_is_there():
    store = _Store(set())
    sched = _sched(store, 2)
    assert sched.matched_tokens("probe", PROMPT, None, 0) == (0, False)
    hashes = sorted({k.block_hash for k in store.asked[0]}, key=[k.block_hash for k in store.asked[0]].index)
    assert store.asked[0][:4] == [ChunkKey(hashes[0], 0, 0, 2), ChunkKey(hashes[0], 0, 2, 4),
                                  ChunkKey(hashes[0], 1, 0, 2), ChunkKey(hashes[0], 1, 2, 4)]
    # chunk 0 whole, chunk 1 without its second slice of layer 1 (the other prefill rank's): one chunk is found
    store.present = {ChunkKey(h, layer, a, b) for h in hashes[:2] for layer in range(LAYERS)
                     for a, b in ((0, 2), (2, 4))} - {ChunkKey(hashes[1], 1, 2, 4)}
    assert _sched(store, 2).matched_tokens("r", PROMPT, None, 0) == (CHUNK, True)


def test_a_decode_leg_expects_its_prefills_slices_and_a_prefill_leg_says_its_own():
    sched = _sched(_Store(set()), 1)
    for req_id, params in (("full", {DO_REMOTE_PREFILL: True, RELAY_ID: "a", "head_slices": 2}),
                           ("light", {DO_REMOTE_PREFILL: True, RELAY_ID: "b"}),
                           ("bad", {DO_REMOTE_PREFILL: True, RELAY_ID: "c", "head_slices": 3})):
        offer, _ = sched.matched_tokens(req_id, PROMPT, params, 0)
        sched.after_alloc(req_id, list(range(6)), offer)
    loads = sched.build_meta([], lambda rid: list(range(6))).loads
    assert {spec.req_id: spec.head_slices for spec in loads} == {"full": 2, "light": 1, "bad": 1}
    prefill = _sched(_Store(set()), 2)
    prefill.matched_tokens("p", PROMPT, {DO_REMOTE_DECODE: True, RELAY_ID: "p"}, len(PROMPT))
    prefill.build_meta([("p", 0, len(PROMPT))], lambda rid: list(range(6)))
    _, params = prefill.finished("p")
    assert params is not None and params["head_slices"] == 2 and (params["head_start"], params["head_end"]) == (0, 4)
