"""An aborted prefill stops publishing and gives its store reservation back at once (issue 26), on the
reference engine with a real store daemon.  A client that leaves during the prefill leg gets its leg
closed and the engine aborts the request while the forward pass still runs: the publisher must publish no
further layer of it and release the reserved chunks now, not let them drain layer by layer (seconds on a
deep model) or wait for the reservation's TTL."""

from __future__ import annotations

import threading
import time

import pytest

from kvrelay.connector import FailureCode
from kvrelay.engines.reference.config import EngineConfig, ModelConfig
from kvrelay.engines.reference.engine import Engine
from kvrelay.engines.reference.kv_connector import make_hooks
from kvrelay.engines.reference.sequence import SamplingParams, Sequence
from kvrelay.engines.reference.weights import random_weights

from engine_helpers import rand_prompt
from holdings import store_held
from waiting import wait_until

RELEASED_WITHIN_S = 1.0
# deep enough that the forward pass (and so the layer-by-layer publish) lasts seconds after layer 0
DEEP = ModelConfig(num_layers=48, model_id="kvrelay-ref-48l-512")


@pytest.mark.timeout(300)
def test_prefill_aborted_mid_forward_releases_its_reservation_within_a_second(store):
    weights = random_weights(DEEP)
    cfg = EngineConfig(role="prefill", block_size=16, num_blocks=512)
    pub, _ = make_hooks("prefill", DEEP, cfg, store.address, "shm")
    eng = Engine(DEEP, cfg, weights, publisher=pub).start()
    try:
        before = store_held(store)
        done = threading.Event()
        seq = Sequence(rand_prompt(3000, seed=262610), SamplingParams(max_tokens=1), publish=True,
                       request_id="prefill-abort-1", on_token=lambda s, t, fin: fin and done.set())
        eng.add(seq)
        # the first layer is committed: the reservation of every layer is in the store, the forward runs on
        wait_until(lambda: seq.publish_state is not None and seq.publish_state.committed_bytes > 0, 120,
                   "the prefill committed its first layer")
        state = seq.publish_state
        assert state is not None and store_held(store)[1] > before[1], "the prefill's reservation is not in the store"
        aborted_at = time.monotonic()
        eng.abort(seq.request_id)
        wait_until(lambda: store_held(store) == before, RELEASED_WITHIN_S,
                   "store pins and reserved bytes back after the prefill's abort")
        assert time.monotonic() - aborted_at <= RELEASED_WITHIN_S + 0.5  # the stats calls took no longer
        committed = state.committed_bytes
        # the publisher reads the request's blocks no more, and the engine frees them once it settled
        wait_until(lambda: not state.holds_blocks, RELEASED_WITHIN_S, "the publisher let go of the blocks")
        assert state.failure is not None and state.failure.code is FailureCode.ABORTED, state.failure
        wait_until(lambda: done.is_set() and eng.blocks.num_free == cfg.num_blocks, 120,
                   "the aborted prefill finished and its blocks are free")
        assert state.committed_bytes == committed, "layers were published after the abort"
        assert store_held(store) == before
    finally:
        eng.stop()
