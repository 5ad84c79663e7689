"""The reference engine's device-tier KV events: the full blocks of a finished prompt are BlockStored in
GPU with the shared hash chain (at a consumer block size that splits the engine's blocks), and a block
reused for other tokens is BlockRemoved: the view equals the engine's prefix-cache map."""

from __future__ import annotations

import torch

from kvrelay.engines.reference.config import EngineConfig, ModelConfig
from kvrelay.engines.reference.engine import Engine
from kvrelay.engines.reference.sequence import SamplingParams
from kvrelay.engines.reference.weights import random_weights
from kvrelay.events.engine import DeviceEvents
from kvrelay.events.hashing import chain
from kvrelay.events.subscriber import EventSubscriber
from kvrelay.events.view import EventView
from kvrelay.events.wire import MEDIUM_GPU

WAIT = 60.0


def test_engine_publishes_its_prefix_cache():
    torch.set_num_threads(1)
    mcfg = ModelConfig(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=2, num_kv_heads=1,
                       head_dim=32, vocab_size=512, model_id="events-tiny")
    ecfg = EngineConfig(block_size=16, num_blocks=8, max_num_seqs=2, max_num_batched_tokens=256, max_model_len=128)
    engine = Engine(mcfg, ecfg, random_weights(mcfg))
    events = engine.blocks.events = DeviceEvents(16, engine.compat_hash, block_size=8)
    view = EventView()
    sub = EventSubscriber(events.publisher.endpoint, events.publisher.replay_endpoint, view.on_batch,
                          on_resync=view.on_resync, source="e").start()
    try:
        assert sub.wait_in_step(WAIT)
        p1 = [(7 * i) % 500 + 1 for i in range(49)]  # 3 full engine blocks (+1 token): 6 event blocks
        engine.generate([p1], SamplingParams(max_tokens=1, ignore_eos=True))
        want1 = chain(p1[:48], 8, engine.compat_hash)
        assert view.wait_for(lambda v: set(want1) <= v.hashes("e", MEDIUM_GPU), WAIT), sub.stats()
        assert view.blocks("e", MEDIUM_GPU)[want1[3]] == (want1[2], tuple(p1[24:32]))
        p2 = [(11 * i) % 500 + 3 for i in range(113)]  # needs all 8 blocks: p1's are taken and removed
        engine.generate([p2], SamplingParams(max_tokens=1, ignore_eos=True))

        want2 = set(chain(p2[:112], 8, engine.compat_hash))
        assert len(want2) == 2 * len(engine.blocks.hash_to_block)  # one event block pair per engine block

        def matches(v: EventView) -> bool:  # the whole final state: a count alone also matches half-way,
            return v.hashes("e", MEDIUM_GPU) == want2  # with p2's first blocks stored before p1's are removed
        assert view.wait_for(matches, WAIT), (sorted(view.hashes("e", MEDIUM_GPU)), sorted(want2))
        assert view.hashes("e", MEDIUM_GPU).isdisjoint(want1)
    finally:
        sub.close()
        events.close()
