"""Tensor parallelism in the engine-independent publisher and puller (kvrelay.connector.heads), against a real
store daemon: prefill ranks publish the KV heads they hold, decode ranks pull their share, whatever the two
sides' TP sizes, and the bytes each rank pulls are its share (not the whole cache) when the slices allow it."""

from __future__ import annotations

import threading
import time
import zlib

import pytest
import torch
from prometheus_client import CollectorRegistry

from kvrelay.connector import (
    EngineCache, FailureCode, LayerPublisher, LayerPuller, PublishPhase, PublishRequest, PullPhase, PullState,
    TransferMetrics)
from kvrelay.connector.heads import HeadSlices, default_slices, rank_heads
from kvrelay.kernels.layout import KVLayout, Order
from kvrelay.store.client import StoreClient
from kvrelay.store.process import DaemonProcess

MODEL = "tp-test-model"
LAYERS, DIM, CHUNK, N = 2, 8, 32, 80  # 80 tokens: two full chunks and a partial one


def _layout(total: int, tp: int, rank: int, block_size: int) -> KVLayout:
    start, end, _ = rank_heads(total, tp, rank)
    return KVLayout(num_layers=LAYERS, num_blocks=16, block_size=block_size, num_kv_heads=end - start,
                    head_dim=DIM, dtype=torch.float32, order=Order.NHD, kv_fused=True, head_start=start,
                    total_kv_heads=total)


def _model_kv(total: int, seed: int) -> torch.Tensor:
    """The prompt's KV of every head: [layers, 2, tokens, heads, dim]."""
    return torch.randn(LAYERS, 2, N, total, DIM, generator=torch.Generator().manual_seed(seed))


def _cache(layout: KVLayout, kv: torch.Tensor | None, blocks: list[int]) -> EngineCache:
    """A rank's paged cache (NHD, [2, blocks, block_size, heads, dim] per layer), holding its heads of ``kv``."""
    layers = layout.allocate()
    if kv is not None:
        for layer, t in zip(layers, kv, strict=True):
            assert isinstance(t, torch.Tensor) and isinstance(layer, torch.Tensor)
            for tok in range(N):
                b, o = blocks[tok // layout.block_size], tok % layout.block_size
                layer[:, b, o] = t[:, tok, layout.head_start:layout.head_end]
    return EngineCache(layout, layers, MODEL, layout.compat_hash(MODEL), f"epoch-{layout.head_start}",
                       TransferMetrics(CollectorRegistry(), "tp"))


def _read(cache: EngineCache, blocks: list[int]) -> torch.Tensor:
    lo = cache.layout
    out = torch.empty(LAYERS, 2, N, lo.num_kv_heads, DIM)
    for i, layer in enumerate(cache.layers):
        assert isinstance(layer, torch.Tensor)
        for tok in range(N):
            out[i, :, tok] = layer[:, blocks[tok // lo.block_size], tok % lo.block_size]
    return out


@pytest.fixture(scope="module")
def daemon():
    d = DaemonProcess(pool_size="64MiB", transports="shm").start()
    try:
        yield d
    finally:
        d.stop()


def _client(daemon, layout: KVLayout) -> StoreClient:
    return StoreClient(daemon.address, transport="shm", compat_hash=layout.compat_hash(MODEL), staging_bytes=4 << 20)


def _publish(daemon, rid: str, kv: torch.Tensor, total: int, tp: int, slices: int) -> list:
    """Every rank of a TP ``tp`` prefill publishes request ``rid``; returns each rank's settled state."""
    blocks = list(range(3, 3 + -(-N // 16)))
    states, pubs, done = [], [], threading.Semaphore(0)
    for rank in range(tp):
        layout = _layout(total, tp, rank, 16)
        pub = LayerPublisher(_client(daemon, layout), daemon.address, "shm", chunk_tokens=CHUNK,
                             heads=HeadSlices(total, slices), publishes_heads=rank_heads(total, tp, rank)[2])
        pub.bind(_cache(layout, kv, blocks))
        pubs.append(pub)
        # a prompt of its own per request: the store is content-addressed, and another test's KV of the same
        # prompt would be served as this one's
        prompt = [zlib.crc32(rid.encode()) % 100_000 * 100 + i for i in range(N)]
        states += pub.begin([PublishRequest(rid, prompt, blocks, first_token=False)])
    try:
        for pub, state in zip(pubs, states, strict=True):
            for layer in range(LAYERS):
                pub.layer_done(layer)
            pub.end([state], [None], lambda s: done.release())
        for _ in pubs:
            assert done.acquire(timeout=30)
    finally:
        for pub in pubs:
            pub.close()
    assert all(s.phase is PublishPhase.COMMITTED for s in states), [s.failure for s in states]
    return states


def _pull(daemon, params, total: int, tp: int, deadline_s: float = 30.0) -> list[tuple[PullState, torch.Tensor]]:
    """Every rank of a TP ``tp`` decode (block size 32) pulls ``params``; (state, the heads it holds) per rank."""
    blocks = list(range(5, 5 + -(-N // 32)))
    out = []
    for rank in range(tp):
        layout = _layout(total, tp, rank, 32)
        cache = _cache(layout, None, blocks)
        puller = LayerPuller(_client(daemon, layout), daemon.address)
        puller.bind(cache)
        settled = threading.Event()
        state = PullState(params, blocks, fetch_first_token=False)
        try:
            puller.start(state, time.monotonic() + deadline_s, lambda s, ev=settled: ev.set())
            assert settled.wait(deadline_s + 10)
        finally:
            puller.close()
        out.append((state, _read(cache, blocks)))
    return out


def _share_bytes(heads: int) -> int:
    return LAYERS * 2 * N * heads * DIM * 4


@pytest.mark.parametrize("pre_tp,dec_tp,slices,pulled_heads", [
    (2, 1, 2, [4]),  # the decode assembles its heads from both prefill ranks' chunks
    (1, 2, 2, [2, 2]),  # each decode rank pulls its half, never the whole chunk
    (1, 2, 1, [4, 4]),  # one slice: each rank pulls all heads and keeps its half (correct, twice the bytes)
    (2, 4, 4, [1, 1, 1, 1]),
    (4, 2, 4, [2, 2]),
])
def test_ranks_publish_their_heads_and_pull_their_share(daemon, pre_tp, dec_tp, slices, pulled_heads):
    total = 4
    kv = _model_kv(total, seed=pre_tp * 10 + dec_tp + slices)
    rid = f"tp-{pre_tp}-{dec_tp}-{slices}"
    states = _publish(daemon, rid, kv, total, pre_tp, slices)
    assert sum(s.committed_bytes for s in states) == _share_bytes(total)  # every head published once
    pulled = _pull(daemon, states[0].params, total, dec_tp)
    for rank, ((state, got), heads) in enumerate(zip(pulled, pulled_heads, strict=True)):
        start, end, _ = rank_heads(total, dec_tp, rank)
        assert state.phase is PullPhase.DONE and state.failure is None, state.failure
        assert torch.equal(got, kv[:, :, :, start:end]), f"decode rank {rank} holds other KV"
        assert state.pulled_bytes == _share_bytes(heads)


def test_replicated_heads_are_published_once_and_pulled_by_every_rank(daemon):
    total, tp = 1, 2  # 1 KV head at TP 2: both ranks hold head 0, rank 0 publishes it
    assert [rank_heads(total, tp, r) for r in range(tp)] == [(0, 1, True), (0, 1, False)]
    kv = _model_kv(total, seed=7)
    states = _publish(daemon, "tp-replicated", kv, total, tp, default_slices(total, tp))
    assert [s.committed_bytes for s in states] == [_share_bytes(1), 0]  # settled, nothing sent twice
    for state, got in _pull(daemon, states[0].params, total, tp):
        assert state.failure is None and torch.equal(got, kv)


def test_a_pull_cut_otherwise_than_the_publish_fails_at_once_naming_both_cuts(daemon):
    """A decode that expects whole-head chunks from a prefill that published halves can never be served: the
    store says so as soon as the prefill reserved, not after the pull's deadline."""
    total = 4
    kv = _model_kv(total, seed=3)
    states = _publish(daemon, "tp-cut", kv, total, 2, 2)
    import msgspec
    params = msgspec.structs.replace(states[0].params, head_slices=1)
    t0 = time.monotonic()
    [(state, _)] = _pull(daemon, params, total, 1, deadline_s=20)
    assert state.failure is not None and state.failure.code is FailureCode.MISMATCH, state.failure
    assert "[(0, 2), (2, 4)]" in state.failure.message and "[0, 4)" in state.failure.message
    assert time.monotonic() - t0 < 10


def test_head_slices_rules():
    assert HeadSlices(8, 4).ranges() == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert HeadSlices(8, 4).covering(3, 6) == [(2, 4), (4, 6)]
    assert HeadSlices(8, 4).inside(4, 8) == [(4, 6), (6, 8)]
    with pytest.raises(ValueError, match="multiple of the tensor-parallel size"):
        HeadSlices(8, 2).inside(0, 2)  # a TP 4 rank cannot publish a quarter of a half
    with pytest.raises(ValueError, match="divide the KV head count"):
        HeadSlices(6, 4)
    assert [rank_heads(2, 4, r) for r in range(4)] == [(0, 1, True), (0, 1, False), (1, 2, True), (1, 2, False)]
    with pytest.raises(ValueError, match="evenly"):
        rank_heads(6, 4, 0)
    assert default_slices(8, 1) == 1 and default_slices(8, 2) == 2 and default_slices(1, 2) == 1
