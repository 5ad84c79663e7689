"""Block manager, scheduler and engine: prefix caching, continuous batching gives the same tokens as
one request at a time, preemption, sampling, validation, no leaked blocks."""

from __future__ import annotations

import threading

import pytest

from kvrelay.engines.reference.block_manager import BlockManager
from kvrelay.engines.reference.config import EngineConfig
from kvrelay.engines.reference.engine import Engine
from kvrelay.engines.reference.sequence import SamplingParams, Sequence

from engine_helpers import rand_prompt
from waiting import wait_until


def test_block_manager_prefix_hits_and_release():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = Sequence(list(range(10)), SamplingParams())
    bm.allocate(a)
    assert len(a.block_table) == 3 and a.num_cached_tokens == 0 and bm.num_free == 5
    b = Sequence(list(range(9)) + [99], SamplingParams())
    bm.allocate(b)
    assert b.num_cached_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    bm.free_seq(a)
    bm.free_seq(b)
    assert bm.num_free == 8
    c = Sequence(list(range(8)), SamplingParams())  # all-cached prompt: the last block is recomputed
    bm.allocate(c)
    assert c.num_cached_tokens == 4
    bm.free_seq(c)
    d = Sequence(list(range(8)), SamplingParams())
    bm.allocate(d, cacheable_tokens=8, register=False)
    assert d.num_cached_tokens == 8
    bm.free_seq(d)
    assert bm.num_free == 8 and all(blk.ref_count == 0 for blk in bm.blocks)


def test_block_manager_forget_drops_unfilled_blocks():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = Sequence(list(range(8)), SamplingParams())
    bm.allocate(a, cacheable_tokens=8)
    bm.forget(a)
    b = Sequence(list(range(8)), SamplingParams())
    bm.allocate(b, cacheable_tokens=8)
    assert b.num_cached_tokens == 0


@pytest.fixture(scope="module")
def prompts():
    return [rand_prompt(n, seed=100 + n) for n in (1, 9, 17, 129, 300)]


@pytest.fixture(scope="module")
def one_by_one(model_cfg, weights, prompts):
    eng = Engine(model_cfg, EngineConfig(), weights)
    return [eng.generate([p], SamplingParams(max_tokens=4))[0] for p in prompts]


@pytest.mark.timeout(300)
def test_continuous_batching_matches_one_at_a_time(model_cfg, weights, prompts, one_by_one):
    eng = Engine(model_cfg, EngineConfig(block_size=8, num_blocks=512, max_num_seqs=5,
                                         max_num_batched_tokens=256), weights)
    out = eng.generate(prompts, SamplingParams(max_tokens=4))
    assert out == one_by_one
    assert eng.blocks.num_free == 512  # nothing leaked


@pytest.mark.timeout(300)
def test_preemption_keeps_outputs(model_cfg, weights):
    prompts = [rand_prompt(8, seed=200 + i) for i in range(3)]
    free = Engine(model_cfg, EngineConfig(), weights)
    want = free.generate(prompts, SamplingParams(max_tokens=6))
    # 6 blocks of 4 tokens: all three prompts fit, their decodes do not, so the youngest is preempted
    eng = Engine(model_cfg, EngineConfig(block_size=4, num_blocks=6, max_model_len=24), weights)
    assert eng.generate(prompts, SamplingParams(max_tokens=6)) == want
    assert eng.scheduler.num_preempted > 0
    assert eng.blocks.num_free == 6


@pytest.mark.timeout(300)
def test_prefix_cache_hits_keep_outputs(model_cfg, weights, prompts, one_by_one):
    eng = Engine(model_cfg, EngineConfig(block_size=8, num_blocks=512), weights)
    assert eng.generate(prompts[-2:], SamplingParams(max_tokens=4)) == one_by_one[-2:]
    hits = eng.blocks.hits
    assert eng.generate(prompts[-2:], SamplingParams(max_tokens=4)) == one_by_one[-2:]
    assert eng.blocks.hits > hits
    assert eng.blocks.num_free == 512


@pytest.mark.timeout(120)
def test_seeded_temperature_sampling_is_reproducible(model_cfg, weights):
    eng = Engine(model_cfg, EngineConfig(), weights)
    p = rand_prompt(20, seed=7)
    a = eng.generate([p], SamplingParams(max_tokens=3, temperature=0.8, seed=1))
    b = eng.generate([p], SamplingParams(max_tokens=3, temperature=0.8, seed=1))
    c = eng.generate([p], SamplingParams(max_tokens=3, temperature=0.8, seed=2))
    g = eng.generate([p], SamplingParams(max_tokens=3))
    assert a == b and a != c and len(g[0]) == 3


def test_bad_requests_raise_clear_errors(model_cfg, weights):
    eng = Engine(model_cfg, EngineConfig(max_model_len=64, num_blocks=8, block_size=8), weights)
    with pytest.raises(ValueError, match="max_model_len"):
        eng.add(Sequence(list(range(60)), SamplingParams(max_tokens=10)))
    with pytest.raises(ValueError, match="vocabulary"):
        eng.add(Sequence([40000], SamplingParams()))
    with pytest.raises(ValueError, match="empty"):
        eng.add(Sequence([], SamplingParams()))
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="role"):
        EngineConfig(role="both")
    with pytest.raises(ValueError, match="num_blocks"):
        EngineConfig(num_blocks=2, block_size=16, max_model_len=4096)


@pytest.mark.timeout(120)
def test_abort_frees_blocks(model_cfg, weights):
    eng = Engine(model_cfg, EngineConfig(num_blocks=64, max_model_len=1024), weights).start()
    try:
        first = threading.Event()
        done = threading.Event()

        def on_token(seq, tok, fin):
            first.set()
            if fin:
                done.set()

        seq = Sequence(rand_prompt(40, seed=9), SamplingParams(max_tokens=500, ignore_eos=True), on_token=on_token)
        eng.add(seq)
        assert first.wait(60)
        eng.abort(seq.request_id)
        assert done.wait(60)
        assert seq.error == "aborted" and len(seq.output) < 500
        wait_until(lambda: eng.blocks.num_free == 64, 10, "the aborted sequence's blocks freed")
    finally:
        eng.stop()
