"""An aborted request releases what it held in the store at once (issue 26), on the reference engine with a
real store daemon: its pins and reserved bytes are back at their earlier values within a second of the
abort, and the decode engine's blocks are free.  Each test would fail with a release by lease expiry
(``pull_pin_ttl``, 30 s) or by the pull's deadline (60 s here)."""

from __future__ import annotations

import threading

import pytest

from kvrelay.connector import PullPhase, transfer_params
from kvrelay.engines.reference.config import EngineConfig
from kvrelay.engines.reference.engine import Engine
from kvrelay.engines.reference.kv_connector import make_hooks
from kvrelay.engines.reference.sequence import SamplingParams, Sequence, Status
from kvrelay.store.client import StoreClient

from engine_helpers import rand_prompt
from holdings import store_held
from waiting import wait_until

RELEASED_WITHIN_S = 1.0


def _stats(store) -> dict:
    with StoreClient(store.address, transport="shm", compat_hash="stats-only", name="abort-stats") as c:
        return c.stats()


def _prefill_engine(model_cfg, weights, store) -> Engine:
    cfg = EngineConfig(role="prefill", block_size=16, num_blocks=1024)
    pub, _ = make_hooks("prefill", model_cfg, cfg, store.address, "shm")
    return Engine(model_cfg, cfg, weights, publisher=pub)


def _decode_engine(model_cfg, weights, store, transport: str) -> Engine:
    cfg = EngineConfig(role="decode", block_size=16, num_blocks=2048, pull_timeout_s=60.0)
    _, pull = make_hooks("decode", model_cfg, cfg, store.address, transport)
    return Engine(model_cfg, cfg, weights, puller=pull)


@pytest.mark.timeout(120)
def test_decode_aborted_while_its_pull_waits_for_the_prefill_ends_at_once(model_cfg, weights, store):
    """Client disconnect before the first token: the decode leg's pull waits in the store for a prefill
    that will not come.  The abort ends that wait now (the store counts it), not at the 60 s deadline."""
    dec = _decode_engine(model_cfg, weights, store, "shm").start()
    try:
        before, aborts0 = store_held(store), _stats(store)["aborts"]
        prompt = rand_prompt(300, seed=262601)
        kp = transfer_params(prompt, "abort-waiting-1", model_cfg.model_id, dec.compat_hash, dec.cfg.chunk_tokens,
                             model_cfg.num_layers, 0, model_cfg.num_kv_heads, store.address, "shm")
        done = threading.Event()
        seq = Sequence(prompt, SamplingParams(max_tokens=8), request_id="abort-waiting-1", kv_params=kp,
                       on_token=lambda s, t, fin: fin and done.set())
        dec.add(seq)
        wait_until(lambda: seq.pull_state is not None and seq.pull_state.phase is PullPhase.PULLING, 30,
                   "the decode's pull started", interval=0.02)
        dec.abort(seq.request_id)
        assert done.wait(RELEASED_WITHIN_S), "the aborted decode still waits for its prefill"
        assert seq.error == "aborted" and seq.status is Status.FINISHED
        wait_until(lambda: dec.blocks.num_free == dec.cfg.num_blocks, RELEASED_WITHIN_S,
                   "the decode engine's blocks freed", interval=0.02)
        wait_until(lambda: store_held(store) == before, RELEASED_WITHIN_S,
                   "store pins and reserved bytes back", interval=0.02)
        assert _stats(store)["aborts"] == aborts0 + 1  # the store ended the wait
    finally:
        dec.stop()


@pytest.mark.timeout(180)
def test_decode_aborted_after_its_first_token_hands_back_its_pins(model_cfg, weights, store):
    """Client disconnect after the first token: every pull went through the daemon (tcp), which pinned
    each chunk while it was copied.  The pins of the last round trips go back when the pull ends, not with
    the decode's next store request (none here) or at the pin's expiry."""
    before = store_held(store)
    prompt = rand_prompt(1800, seed=262602)
    pre = _prefill_engine(model_cfg, weights, store)
    try:
        (p,) = pre.run([Sequence(prompt, SamplingParams(max_tokens=1), publish=True, request_id="abort-after-1")])
    finally:
        pre.stop()
    assert p.publish_state is not None and p.publish_state.failure is None
    wait_until(lambda: store_held(store) == before, RELEASED_WITHIN_S,
               "the published prefill holds nothing", interval=0.02)
    dec = _decode_engine(model_cfg, weights, store, "tcp").start()
    try:
        first = threading.Event()
        done = threading.Event()

        def on_token(s: Sequence, tok: int, fin: bool) -> None:
            first.set()
            if fin:
                done.set()
        seq = Sequence(prompt, SamplingParams(max_tokens=200, ignore_eos=True), request_id="abort-after-1",
                       kv_params=p.publish_state.params, on_token=on_token)
        dec.add(seq)
        assert first.wait(60), "no first token"
        assert seq.pull_state is not None and seq.pull_state.failure is None and seq.recomputed is None
        dec.abort(seq.request_id)
        assert done.wait(RELEASED_WITHIN_S) and seq.error == "aborted"
        wait_until(lambda: store_held(store) == before, RELEASED_WITHIN_S,
                   "store pins and reserved bytes back", interval=0.02)
        wait_until(lambda: dec.blocks.num_free == dec.cfg.num_blocks, RELEASED_WITHIN_S,
                   "the decode engine's blocks freed", interval=0.02)
    finally:
        dec.stop()
