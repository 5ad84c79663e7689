"""Prefix reuse across hosts (issue 23): a decode engine told by the router that another host's store holds a
prompt's prefix (``kvrelay_prefix_store``/``kvrelay_prefix_tokens``) loads it from there through its peer-store
clients and computes only the rest, token- and logit-identical to colocated.  Real `kvrelay store` daemons on
127.0.0.1 stand for three hosts' stores: "a" (the decode's own), "b" (the prefill's), "c" (holding the same chunk
keys with another model's KV: the negative control).  Also: a hint whose store lost the prefix recomputes at
once (no wait), and with ``keep_copies`` the decode's own store keeps what it loaded, announces it in its KV
events, and the next request on that host reads it over shm -- measured against no copy (printed with -s)."""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time

import pytest
import torch

from engine_helpers import StoreProc, rand_prompt
from kvrelay.connector import PullPhase
from kvrelay.engines.reference import api
from kvrelay.engines.reference.config import EngineConfig
from kvrelay.engines.reference.engine import Engine
from kvrelay.engines.reference.kv_connector import make_hooks
from kvrelay.engines.reference.sequence import SamplingParams, Sequence
from kvrelay.engines.reference.server import EngineServer
from kvrelay.engines.reference.weights import random_weights
from kvrelay.events.subscriber import EventSubscriber
from kvrelay.params import PREFIX_STORE, PREFIX_TOKENS
from kvrelay.router.kvindex import KVIndex, prompt_hashes
from kvrelay.router.policy import Policy
from kvrelay.tokenizer import load_tokenizer
from waiting import wait_until

SP = SamplingParams(max_tokens=4)
CHUNK = 256

pytestmark = pytest.mark.slow  # three store daemons and several engines: about a minute


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    made: dict[str, StoreProc] = {}
    try:
        for name in "abc":
            extra = ("--events", "tcp://127.0.0.1:0") if name == "a" else ()
            made[name] = StoreProc(tmp_path_factory.mktemp(f"store-{name}"), pool_size="512MiB",
                                   transports="shm,tcp", extra=extra)
        yield made
    finally:
        for s in made.values():
            s.close()


def _colocated(model_cfg, weights, prompts: list[list[int]]) -> list[Sequence]:
    eng = Engine(model_cfg, EngineConfig(num_blocks=1024), weights)
    eng.record_logits = True
    return eng.run([Sequence(p, SP) for p in prompts])


def _publish(model_cfg, weights, store: StoreProc, prompt: list[int], salt: str = "") -> None:
    cfg = EngineConfig(role="prefill", num_blocks=1024, chunk_tokens=CHUNK)
    pub, _ = make_hooks("prefill", model_cfg, cfg, store.address, "shm")
    eng = Engine(model_cfg, cfg, weights, publisher=pub)
    try:
        [seq] = eng.run([Sequence(prompt, SP, publish=True, cache_salt=salt)])
        assert seq.publish_state is not None and seq.publish_state.failure is None
    finally:
        eng.stop()


def _decode(model_cfg, weights, stores, keep_copies: bool = False) -> Engine:
    cfg = EngineConfig(role="decode", num_blocks=1024, chunk_tokens=CHUNK, pull_timeout_s=20.0)
    _, pull = make_hooks("decode", model_cfg, cfg, stores["a"].address, "shm",
                         peers=[stores["b"].address, stores["c"].address], remote_transport="tcp",
                         keep_copies=keep_copies)
    eng = Engine(model_cfg, cfg, weights, puller=pull)
    eng.record_logits = True
    return eng


def _hinted(eng: Engine, prompt: list[int], store: str, tokens: int, rid: str, salt: str = "") -> Sequence:
    """What the engine's HTTP server makes of a decode request carrying the router's hint."""
    server = EngineServer(eng, load_tokenizer(None, eng.model_cfg.vocab_size), eng.model_cfg.model_id)
    body = {"prompt": prompt, "max_tokens": SP.max_tokens, "request_id": rid,
            "kv_transfer_params": {PREFIX_STORE: store, PREFIX_TOKENS: tokens}, **({"cache_salt": salt} if salt else {})}
    req = api.parse(body, server.tok, chat=False)
    hint = api.prefix_hint(body)
    assert hint is not None
    params = server._prefix_params(req, *hint)
    assert params is not None
    return Sequence(req.prompt, req.params, request_id=rid, kv_params=params, prefix_load=True,
                    cache_salt=req.cache_salt)


def _loaded(eng: Engine, store: str) -> float:
    return eng.metrics.prefix_loaded_tokens.labels(store)._value.get()


def _same(got: Sequence, want: Sequence) -> bool:
    assert got.logits is not None and want.logits is not None
    return got.output == want.output and all(torch.equal(a, b) for a, b in zip(got.logits, want.logits, strict=True))


def test_a_prefix_in_another_hosts_store_is_loaded_and_the_rest_computed_exactly(model_cfg, weights, stores):
    base = rand_prompt(600, seed=23)
    prompt = base + rand_prompt(40, seed=24)
    _publish(model_cfg, weights, stores["b"], base)
    other = random_weights(dataclasses.replace(model_cfg, seed=99))  # same model id, so the same chunk keys
    _publish(model_cfg, other, stores["c"], base)
    [want] = _colocated(model_cfg, weights, [prompt])

    eng = _decode(model_cfg, weights, stores)
    try:
        [got] = eng.run([_hinted(eng, prompt, stores["b"].address, 600, "hint-b")])
        assert got.error is None and got.recomputed is None, got.recomputed
        assert _same(got, want), "a prefix loaded from another host's store changed the output"
        assert _loaded(eng, "other") == 512  # two whole chunks of the 600 tokens hinted; the rest computed here
        assert eng.metrics.computed_tokens._value.get() == len(prompt) - 512
        assert got.pull_state is not None and got.pull_state.source == stores["b"].address
        assert eng.puller.stores.pulls(stores["b"].address) == 1  # type: ignore[union-attr]
    finally:
        eng.stop()

    control = _decode(model_cfg, weights, stores)  # a fresh engine: nothing of the prompt in its own cache
    try:  # negative control: the same chunk keys with another model's KV must change the logits
        [bad] = control.run([_hinted(control, prompt, stores["c"].address, 600, "hint-c")])
        assert bad.error is None and bad.recomputed is None and _loaded(control, "other") == 512
        assert not _same(bad, want), "the loaded prefix did not reach the logits (the test proves nothing)"
    finally:
        control.stop()


def test_a_hint_whose_store_lost_the_prefix_recomputes_at_once(model_cfg, weights, stores):
    prompt = rand_prompt(700, seed=31)  # published nowhere
    [want] = _colocated(model_cfg, weights, [prompt])
    eng = _decode(model_cfg, weights, stores)
    try:
        t0 = time.monotonic()
        [got] = eng.run([_hinted(eng, prompt, stores["b"].address, 600, "hint-gone")])
        took = time.monotonic() - t0
        assert got.recomputed is not None and "no longer holds" in str(got.recomputed), got.recomputed
        assert took < 10, f"a prefix the store does not hold was waited for ({took:.1f} s; pull deadline 20 s)"
        assert _same(got, want) and eng.metrics.computed_tokens._value.get() == len(prompt)
    finally:
        eng.stop()


def test_a_tenants_prefix_is_loaded_for_that_tenant_only(model_cfg, weights, stores):
    base = rand_prompt(600, seed=41)
    prompt = base + rand_prompt(40, seed=42)
    _publish(model_cfg, weights, stores["b"], base, salt="tenant-1")
    [want] = _colocated(model_cfg, weights, [prompt])
    eng = _decode(model_cfg, weights, stores, keep_copies=True)
    try:
        [got] = eng.run([_hinted(eng, prompt, stores["b"].address, 600, "salted-1", salt="tenant-1")])
        assert got.recomputed is None and _loaded(eng, "other") == 512 and _same(got, want)
        # another tenant's request for the same tokens finds nothing of its own there: it computes it all
        [other] = eng.run([_hinted(eng, prompt, stores["b"].address, 600, "salted-2", salt="tenant-2")])
        assert other.recomputed is not None and "no longer holds" in str(other.recomputed), other.recomputed
        assert _loaded(eng, "other") == 512 and _loaded(eng, "own") == 0
    finally:
        eng.stop()


def test_an_unknown_store_in_a_hint_is_refused_by_name(model_cfg, weights, stores):
    eng = _decode(model_cfg, weights, stores)
    try:
        with pytest.raises(ValueError, match="tcp://127.0.0.1:1"):
            _hinted(eng, rand_prompt(300, seed=5), "tcp://127.0.0.1:1", 256, "hint-unknown")
        with pytest.raises(ValueError, match=PREFIX_TOKENS):
            api.prefix_hint({"kv_transfer_params": {PREFIX_STORE: "", PREFIX_TOKENS: -1}})
        with pytest.raises(ValueError, match=PREFIX_STORE):
            api.prefix_hint({"kv_transfer_params": {PREFIX_STORE: "http://x", PREFIX_TOKENS: 3}})
    finally:
        eng.stop()


def _second_request(model_cfg, weights, stores, keep: bool, seed: int) -> dict[str, float]:
    """Two requests for one prefix on two decode engines of host "a" (the second one's own cache is cold): the
    second request's bytes from the far store and its latency, with and without the copy."""
    base = rand_prompt(1100, seed=seed)
    prompts = [base + rand_prompt(50, seed=seed + 1), base + rand_prompt(50, seed=seed + 2)]
    _publish(model_cfg, weights, stores["b"], base)
    want = _colocated(model_cfg, weights, prompts)
    out: dict[str, float] = {}
    for i, prompt in enumerate(prompts):
        eng = _decode(model_cfg, weights, stores, keep_copies=keep)
        try:
            t0 = time.perf_counter()
            [got] = eng.run([_hinted(eng, prompt, stores["b"].address, len(base), f"r{seed}-{i}")])
            wall = time.perf_counter() - t0
            state = got.pull_state
            assert state is not None and state.phase is PullPhase.DONE and got.recomputed is None
            assert _same(got, want[i])
            far = state.pulled_bytes if state.source != stores["a"].address else 0
            out.update({f"far_bytes_{i}": far, f"load_s_{i}": (state.finished or 0) - state.started,
                        f"wall_s_{i}": wall, f"own_{i}": float(state.source == stores["a"].address)})
        finally:
            eng.stop()
    return out


def test_keep_copies_reads_the_next_load_on_the_host_from_its_own_store(model_cfg, weights, stores):
    index = KVIndex()  # the router's view of store a's KV events
    a = stores["a"]
    sub = EventSubscriber(a.info["events"], a.info["events_replay"],
                          lambda source, seq, batch: index.apply(source, batch), source=a.address).start()
    try:
        runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        for rep in range(3):
            for keep in (False, True):  # each run its own prefix: a copy made by one never serves another
                runs[keep].append(_second_request(model_cfg, weights, stores, keep, seed=1000 + 100 * rep + 50 * keep))
        for r in runs[False]:
            assert r["own_1"] == 0 and r["far_bytes_1"] > 0  # no copy: the second load crosses again
        for r in runs[True]:
            assert r["own_0"] == 0 and r["far_bytes_0"] > 0 and r["own_1"] == 1 and r["far_bytes_1"] == 0

        # the copy is announced in store a's events: the router's index sees a's 1,024 tokens of the last prefix
        base = rand_prompt(1100, seed=1000 + 100 * 2 + 50)
        hashes = prompt_hashes(base, [16])
        wait_until(lambda: index.match(a.address, hashes).tokens() == 1024, timeout=10, what="the copy announced",
                   detail=lambda: str(index.stats()))
        nocopy = rand_prompt(1100, seed=1000 + 100 * 2)  # negative control: never copied, never announced by a
        assert index.match(a.address, prompt_hashes(nocopy, [16])).tokens() == 0
        policy = Policy("cache_aware", index)
        policy.followed = {a.address}
        hint = policy.hint(hashes, len(base) + 50)
        assert hint is not None and hint.store == a.address and hint.tokens == 1024 and not hint.whole

        def med(keep: bool, key: str) -> float:
            return statistics.median(r[key] for r in runs[keep])
        print("\nsecond request for a 1,024-token prefix on the same host (3 repeats, medians; loopback tcp "
              "to the far store):")
        for keep in (False, True):
            print(f"  keep_copies={keep}: far bytes first {med(keep, 'far_bytes_0'):.0f}, second "
                  f"{med(keep, 'far_bytes_1'):.0f}; load first {med(keep, 'load_s_0') * 1e3:.1f} ms, second "
                  f"{med(keep, 'load_s_1') * 1e3:.1f} ms; request first {med(keep, 'wall_s_0') * 1e3:.0f} ms, "
                  f"second {med(keep, 'wall_s_1') * 1e3:.0f} ms")
    finally:
        threading.Thread(target=sub.close, daemon=True).start()
