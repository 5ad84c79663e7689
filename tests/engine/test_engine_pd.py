"""Prefill/decode through a real store daemon, in-process engines: greedy P/D output is token-identical
to colocated for 50 prompts of mixed lengths (1 to 2,049 tokens, unaligned) over each transport, with
other block sizes on the decode side and a partly cached prefix there; a negative control; the failure
policies; a decode leg that arrives before its prefill."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from kvrelay.engines.reference.config import EngineConfig
from kvrelay.engines.reference.engine import Engine
from kvrelay.engines.reference.kv_connector import make_hooks
from kvrelay.connector import transfer_params
from kvrelay.engines.reference.sequence import SamplingParams, Sequence, Status

from engine_helpers import TRANSPORTS, rand_prompt
from waiting import wait_until

SP = SamplingParams(max_tokens=3)
LENGTHS = [1, 2, 3, 5, 7, 8, 15, 16, 17, 24, 31, 33, 47, 63, 64, 65, 90, 100, 127, 129, 150, 200, 255, 256, 257,
           300, 333, 383, 400, 511, 513, 640, 777, 1000, 2049]
DECODE_BLOCK = {"shm": 32, "tcp": 8, "nixl": 64}  # the prefill uses 16


def _prompts() -> tuple[list[list[int]], list[list[int]]]:
    base = [rand_prompt(n, seed=1000 + i) for i, n in enumerate(LENGTHS)]
    # extensions share an unaligned prefix with an earlier prompt: decode (and prefill) hold part of it
    ext = []
    for j, (src, keep, extra) in enumerate([(25, 200, 50), (33, 700, 37), (34, 1500, 9), (30, 300, 1), (31, 333, 100),
                                            (21, 150, 13), (29, 400, 64), (32, 513, 3), (26, 257, 250),
                                            (23, 140, 129), (19, 129, 1), (27, 290, 77), (28, 383, 383),
                                            (24, 256, 256), (22, 180, 20)]):
        ext.append(base[src][:keep] + rand_prompt(extra, seed=5000 + j))
    return base, ext


@pytest.fixture(scope="module")
def prompts():
    base, ext = _prompts()
    assert len(base) + len(ext) >= 50 and max(map(len, base)) > 2000
    return base, ext


@pytest.fixture(scope="module")
def colocated(model_cfg, weights, prompts):
    eng = Engine(model_cfg, EngineConfig(num_blocks=1024), weights)
    eng.record_logits = True
    seqs = eng.run([Sequence(p, SP) for p in prompts[0] + prompts[1]])
    return seqs


def _prefill_engine(model_cfg, weights, store, layerwise=True):
    cfg = EngineConfig(role="prefill", block_size=16, num_blocks=1024)
    pub, _ = make_hooks("prefill", model_cfg, cfg, store.address, "shm", layerwise=layerwise)
    return Engine(model_cfg, cfg, weights, publisher=pub)


def _decode_engine(model_cfg, weights, store, transport, block_size=16, **kw):
    cfg = EngineConfig(role="decode", block_size=block_size, num_blocks=32768 // block_size, **kw)
    _, pull = make_hooks("decode", model_cfg, cfg, store.address, transport)
    eng = Engine(model_cfg, cfg, weights, puller=pull)
    eng.record_logits = True
    return eng


@pytest.fixture(scope="module")
def published(model_cfg, weights, store, prompts):
    eng = _prefill_engine(model_cfg, weights, store)
    try:
        base = eng.run([Sequence(p, SP, publish=True) for p in prompts[0]])
        ext = eng.run([Sequence(p, SP, publish=True) for p in prompts[1]])
        assert eng.blocks.num_free == eng.cfg.num_blocks  # every block freed once published
        assert eng.metrics.transfer.publish_errors._metrics == {}
    finally:
        eng.stop()
    return [s.publish_state.params for s in base], [s.publish_state.params for s in ext]


def _value(counter, *labels) -> float:
    return (counter.labels(*labels) if labels else counter)._value.get()


@pytest.mark.slow  # 50 prompts up to 2,049 tokens through colocated, prefill and decode engines: about a minute
@pytest.mark.timeout(400)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_pd_is_token_identical_to_colocated(model_cfg, weights, store, prompts, colocated, published, transport):
    want = [s.output for s in colocated]
    eng = _decode_engine(model_cfg, weights, store, transport, block_size=DECODE_BLOCK[transport])
    try:
        # round 1: the base prompts; round 2: prompts whose prefix this decode engine now holds
        r1 = eng.run([Sequence(p, SP, kv_params=kp) for p, kp in zip(prompts[0], published[0], strict=True)])
        r2 = eng.run([Sequence(p, SP, kv_params=kp) for p, kp in zip(prompts[1], published[1], strict=True)])
        got = [s.output for s in r1 + r2]
        assert [s.recomputed for s in r1 + r2] == [None] * len(got)
        assert got == want
        # the first decode step's logits are bit-identical to colocated's (its second sampled row)
        for s, c in zip(r1 + r2, colocated, strict=True):
            assert torch.equal(s.logits[0], c.logits[1])
        assert _value(eng.metrics.transfer.pulls, "ok", "") == len(got)
        assert _value(eng.metrics.transfer.pull_skipped_tokens) > 0  # partly cached prefixes were not pulled
        assert _value(eng.metrics.computed_tokens) == 0  # nothing recomputed locally
        assert eng.blocks.num_free == eng.cfg.num_blocks
    finally:
        eng.stop()


@pytest.mark.slow  # needs the 50 colocated prompts of the test above
@pytest.mark.timeout(300)
def test_negative_control_another_prompts_kv_changes_the_logits(model_cfg, weights, store, prompts, colocated):
    base = prompts[0]
    idx = [LENGTHS.index(n) for n in (100, 300, 513)]
    others = []
    for i in idx:
        p = list(base[i])
        p[2] = (p[2] + 7) % model_cfg.vocab_size  # differs at one early position
        others.append(p)
    pre = _prefill_engine(model_cfg, weights, store)
    try:
        wrong = [s.publish_state.params for s in pre.run([Sequence(p, SP, publish=True) for p in others])]
    finally:
        pre.stop()
    eng = _decode_engine(model_cfg, weights, store, "shm")
    try:
        right_first = [colocated[i].output[0] for i in idx]
        for kp, t in zip(wrong, right_first, strict=True):
            kp.first_token = t  # same first token: only the KV differs
        seqs = eng.run([Sequence(base[i], SP, kv_params=kp) for i, kp in zip(idx, wrong, strict=True)])
        for s, i in zip(seqs, idx, strict=True):
            diff = (s.logits[0] - colocated[i].logits[1]).abs().max().item()
            assert diff > 0.1, f"another prompt's KV moved the logits by only {diff}"
    finally:
        eng.stop()


def _unpublished(model_cfg, store, prompt, rid, eng, first_token):
    return transfer_params(prompt, rid, model_cfg.model_id, eng.compat_hash, eng.cfg.chunk_tokens,
                           model_cfg.num_layers, 0, model_cfg.num_kv_heads, store.address, "shm",
                           first_token=first_token)


def _park_decode(model_cfg, store, dec, prompt, rid):
    """A decode leg sent before its prefill (first token unknown), parked on the store: (sequence, an event
    set when it finishes)."""
    kp = _unpublished(model_cfg, store, prompt, rid, dec, None)
    done = threading.Event()
    seq = Sequence(prompt, SP, kv_params=kp, on_token=lambda s, t, fin: fin and done.set())
    dec.add(seq)
    wait_until(lambda: seq.status is Status.PULLING, 30, "the decode leg parked on the store")
    return seq, done


@pytest.mark.timeout(120)
def test_pull_deadline_recomputes_locally(model_cfg, weights, store):
    prompt = rand_prompt(129, seed=424242)  # never published: its chunks are not in the store
    want = Engine(model_cfg, EngineConfig(num_blocks=64, max_model_len=1024), weights).generate([prompt], SP)[0]
    eng = _decode_engine(model_cfg, weights, store, "tcp", pull_timeout_s=1.0)
    try:
        kp = _unpublished(model_cfg, store, prompt, "never-prefilled-1", eng, want[0])
        t0 = time.monotonic()
        (seq,) = eng.run([Sequence(prompt, SP, kv_params=kp)], timeout=60)
        assert time.monotonic() - t0 < 30
        assert seq.output == want and seq.error is None
        assert "timeout" in str(seq.recomputed)
        assert _value(eng.metrics.transfer.pulls, "recompute", "timeout") == 1
        assert eng.blocks.num_free == eng.cfg.num_blocks
    finally:
        eng.stop()


@pytest.mark.timeout(120)
def test_pull_failure_with_policy_fail_fails_clearly(model_cfg, weights, store):
    prompt = rand_prompt(17, seed=434343)  # never published
    eng = _decode_engine(model_cfg, weights, store, "shm", pull_timeout_s=0.5, failure_policy="fail")
    try:
        kp = _unpublished(model_cfg, store, prompt, "never-prefilled-2", eng, 5)
        (seq,) = eng.run([Sequence(prompt, SP, kv_params=kp)], timeout=60)
        assert seq.status is Status.FINISHED and seq.output == []
        assert "policy 'fail'" in seq.error and "timeout" in seq.error
        assert _value(eng.metrics.transfer.pulls, "fail", "timeout") == 1
        assert eng.blocks.num_free == eng.cfg.num_blocks
    finally:
        eng.stop()


@pytest.mark.timeout(120)
def test_decode_leg_sent_before_the_prefill_starts(model_cfg, weights, store):
    prompt = rand_prompt(333, seed=454545)  # never published before this test
    want = Engine(model_cfg, EngineConfig(num_blocks=64, max_model_len=1024), weights).generate([prompt], SP)[0]
    dec = _decode_engine(model_cfg, weights, store, "nixl", block_size=8).start()
    try:
        # the router's view: params built from the prompt alone, first token unknown
        seq, done = _park_decode(model_cfg, store, dec, prompt, "early-decode-1")
        pre = _prefill_engine(model_cfg, weights, store)
        try:
            pre.run([Sequence(prompt, SP, publish=True, request_id="early-decode-1")])
        finally:
            pre.stop()
        assert done.wait(60)
        assert seq.output == want and seq.error is None and seq.recomputed is None
    finally:
        dec.stop()


@pytest.mark.timeout(120)
def test_store_full_aborts_the_waiting_decode_at_once(model_cfg, weights):
    """The prefill's reservation is refused (store too small): it aborts the request in the store, and the
    decode leg already parked on its chunks recomputes now instead of at its 60 s pull deadline."""
    from kvrelay.store.process import DaemonProcess
    prompt = rand_prompt(300, seed=464646)
    want = Engine(model_cfg, EngineConfig(num_blocks=64, max_model_len=1024), weights).generate([prompt], SP)[0]
    with DaemonProcess(pool_size="1MiB", max_chunk_bytes="1MiB") as small:
        dec = _decode_engine(model_cfg, weights, small, "shm", pull_timeout_s=60).start()
        try:
            seq, done = _park_decode(model_cfg, small, dec, prompt, "store-full-1")
            t0 = time.monotonic()
            pre = _prefill_engine(model_cfg, weights, small)
            try:
                (p,) = pre.run([Sequence(prompt, SP, publish=True, request_id="store-full-1")])
            finally:
                pre.stop()
            assert p.publish_state.failure is not None and p.output == want[:1]  # the prefill still answers its token
            assert done.wait(30)
            assert time.monotonic() - t0 < 20  # not the 60 s deadline
            assert seq.output == want and seq.error is None and "aborted" in str(seq.recomputed)
            assert _value(dec.metrics.transfer.pulls, "recompute", "aborted") == 1
        finally:
            dec.stop()


@pytest.mark.timeout(180)
def test_a_dead_store_costs_at_most_one_request_and_its_return_is_found(model_cfg, weights, tmp_path):
    """The store killed with -9: the prefill's first publish fails fast (its link sees the refusal) and opens
    the circuit breaker; the requests after it answer without touching the store, and a decode recomputes at
    once.  The store restarted on its port: the breaker's background ping finds it within about a second,
    and P/D is exact again."""
    import signal
    from kvrelay.httpjson import free_port
    from kvrelay.connector import BreakerState
    from kvrelay.store.process import DaemonProcess
    port = free_port()
    prompts = [rand_prompt(100 + i, seed=474700 + i) for i in range(6)]
    ref = Engine(model_cfg, EngineConfig(num_blocks=256, max_model_len=1024), weights)
    want = ref.generate(prompts, SP)
    d = DaemonProcess(pool_size="256MiB", port=port, transports="shm,tcp").start()
    pre = _prefill_engine(model_cfg, weights, d)
    dec = _decode_engine(model_cfg, weights, d, "tcp", pull_timeout_s=60)
    d2 = None
    try:
        (s,) = pre.run([Sequence(prompts[0], SP, publish=True)])
        assert s.publish_state.failure is None
        breaker = pre.publisher.breaker
        d.stop(signal.SIGKILL)
        t0 = time.monotonic()
        seqs = pre.run([Sequence(p, SP, publish=True) for p in prompts[1:4]], timeout=60)
        assert time.monotonic() - t0 < 20  # no reserve or abort waits out a 10 s timeout, let alone three
        assert [q.output for q in seqs] == [w[:1] for w in want[1:4]]  # the prefill still answers
        assert all(q.publish_state.failure is not None for q in seqs)
        assert breaker.state is BreakerState.OPEN and breaker.opened == 1 and breaker.skipped >= 1
        tm = pre.metrics.transfer
        assert tm.breaker_open.collect()[0].samples[0].value == 1.0
        assert _value(tm.breaker_skipped) == breaker.skipped
        assert pre.blocks.num_free == pre.cfg.num_blocks
        # the decode side: a pull fails at once, the request is recomputed, exactly
        kp = transfer_params(prompts[4], "dead-store-1", model_cfg.model_id, dec.layout.compat_hash(model_cfg.model_id),
                             dec.cfg.chunk_tokens, model_cfg.num_layers, 0, model_cfg.num_kv_heads, d.address, "tcp")
        t0 = time.monotonic()
        (q,) = dec.run([Sequence(prompts[4], SP, kv_params=kp)], timeout=60)
        assert time.monotonic() - t0 < 20 and q.output == want[4] and q.recomputed is not None
        # the store comes back on the same port: both breakers close by themselves
        d2 = DaemonProcess(pool_size="256MiB", port=port, transports="shm,tcp").start()
        breakers = (breaker, dec.puller.breaker)
        wait_until(lambda: all(b.state is BreakerState.CLOSED for b in breakers), 10, "both breakers closed")
        assert tm.breaker_open.collect()[0].samples[0].value == 0.0
        (s,) = pre.run([Sequence(prompts[5], SP, publish=True, request_id="after-restart-1")])
        assert s.publish_state.failure is None, s.publish_state.failure
        (q,) = dec.run([Sequence(prompts[5], SP, kv_params=s.publish_state.params)], timeout=60)
        assert q.output == want[5] and q.recomputed is None
    finally:
        pre.stop()
        dec.stop()
        for x in (d, d2):
            if x is not None:
                x.stop()
