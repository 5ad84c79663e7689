"""The engine-independent publisher and puller (`kvrelay.connector`), driven with no engine at all:
a paged cache built from a `KVLayout`, block ids, and callbacks, against a real `kvrelay store` daemon.
Byte-exact across block sizes, typed failures with their codes, layer-wise progress, cancellation."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from prometheus_client import CollectorRegistry

from kvrelay.connector import (
    EngineCache, FailureCode, LayerPublisher, LayerPuller, PublishPhase, PublishRequest, PullPhase, PullState,
    TransferError, TransferFailure, TransferMetrics, transfer_params)
from kvrelay.kernels.layout import KVLayout, Order
from kvrelay.store.client import StoreClient
from kvrelay.store.control import StoreError, StoreFullError
from kvrelay.store.process import DaemonProcess

MODEL = "connector-test-model"
LAYERS, HEADS, DIM, CHUNK = 3, 2, 16, 64


def _layout(block_size: int, num_blocks: int = 64, order: Order = Order.NHD) -> KVLayout:
    return KVLayout(num_layers=LAYERS, num_blocks=num_blocks, block_size=block_size, num_kv_heads=HEADS,
                    head_dim=DIM, dtype=torch.float32, order=order, kv_fused=True)


def _cache(layout: KVLayout, seed: int | None) -> tuple[EngineCache, CollectorRegistry]:
    layers = layout.allocate()
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        for t in layers:
            assert isinstance(t, torch.Tensor)
            t.copy_(torch.randn(t.shape, generator=g))
    reg = CollectorRegistry()
    return EngineCache(layout, layers, MODEL, layout.compat_hash(MODEL), "epoch-1",
                       TransferMetrics(reg, "test")), reg


def _tokens(layout: KVLayout, cache: EngineCache, blocks: list[int], n: int) -> torch.Tensor:
    """The KV of tokens [0, n) as [layers, 2, n, heads, dim], read through the layout's own view."""
    out = []
    for layer in cache.layers:
        assert isinstance(layer, torch.Tensor)
        rows = []
        for t in range(n):
            b, o = blocks[t // layout.block_size], t % layout.block_size
            if layout.order is Order.NHD:
                rows.append(layer[:, b, o])  # [2, heads, dim]
            else:
                rows.append(layer[:, b, :, o])
        out.append(torch.stack(rows, 1))
    return torch.stack(out)


def _value(reg: CollectorRegistry, name: str, labels: dict | None = None) -> float:
    return reg.get_sample_value(name, labels or {}) or 0.0


@pytest.fixture(scope="module")
def daemon():
    d = DaemonProcess(pool_size="64MiB", transports="shm,tcp").start()
    try:
        yield d
    finally:
        d.stop()


def _client(daemon, layout: KVLayout, transport: str = "shm") -> StoreClient:
    return StoreClient(daemon.address, transport=transport, compat_hash=layout.compat_hash(MODEL),
                       staging_bytes=8 << 20)


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_publish_then_pull_is_byte_exact_across_block_sizes(daemon, transport):
    src_layout, dst_layout = _layout(16), _layout(32, order=Order.HND)
    src, src_reg = _cache(src_layout, seed=1)
    dst, dst_reg = _cache(dst_layout, seed=None)
    n = 150  # two full chunks and a partial one
    prompt = list(range(1000, 1000 + n))
    src_blocks = list(range(40, 40 + -(-n // 16)))
    dst_blocks = list(range(7, 7 + -(-n // 32)))
    pub = LayerPublisher(_client(daemon, src_layout), daemon.address, transport, chunk_tokens=CHUNK)
    pull = LayerPuller(_client(daemon, dst_layout, transport), daemon.address)
    pub.bind(src)
    pull.bind(dst)
    try:
        states = pub.begin([PublishRequest(f"req-{transport}", prompt, src_blocks)])
        assert [s.phase for s in states] == [PublishPhase.PUBLISHING]
        settled = threading.Event()
        # the decode side starts before the prefill published anything: its pulls park in the store
        ps = PullState(states[0].params, dst_blocks)
        pull.start(ps, time.monotonic() + 30, lambda s: settled.set())
        for layer in range(LAYERS):
            pub.layer_done(layer)
        published = threading.Event()
        pub.end(states, [4242], lambda s: published.set())
        assert published.wait(30) and settled.wait(30)
        assert states[0].phase is PublishPhase.COMMITTED and states[0].failure is None
        assert ps.phase is PullPhase.DONE and ps.failure is None and ps.layers_done == LAYERS
        assert ps.first_token == 4242
        assert torch.equal(_tokens(src_layout, src, src_blocks, n), _tokens(dst_layout, dst, dst_blocks, n))
        want = LAYERS * n * 2 * HEADS * DIM * 4
        assert _value(src_reg, "test_published_bytes_total") == want == ps.pulled_bytes
        assert _value(dst_reg, "test_pulled_bytes_total") == want
    finally:
        pub.close()
        pull.close()


def test_stored_prefix_is_not_sent_again(daemon):
    """A request that loaded its first chunks from the store publishes only the chunks after them; a puller
    of the whole prompt still gets every token (the prefix from the first publish)."""
    layout = _layout(16)
    src, src_reg = _cache(layout, seed=5)
    dst, _ = _cache(layout, seed=None)
    n = 150
    prompt = list(range(5000, 5000 + n))
    blocks = list(range(-(-n // 16)))
    pub = LayerPublisher(_client(daemon, layout), daemon.address, "shm", chunk_tokens=CHUNK)
    pull = LayerPuller(_client(daemon, layout), daemon.address)
    pub.bind(src)
    pull.bind(dst)

    def publish(req: PublishRequest) -> None:
        states = pub.begin([req])
        for layer in range(LAYERS):
            pub.layer_done(layer)
        done = threading.Event()
        pub.end(states, [None], lambda s: done.set())
        assert done.wait(30) and states[0].phase is PublishPhase.COMMITTED

    try:
        publish(PublishRequest("first", prompt[:CHUNK], blocks, first_token=False))  # one whole chunk
        sent = _value(src_reg, "test_published_bytes_total")
        assert sent == LAYERS * CHUNK * 2 * HEADS * DIM * 4
        publish(PublishRequest("second", prompt, blocks, first_token=False, stored_tokens=CHUNK))
        assert _value(src_reg, "test_published_bytes_total") - sent == LAYERS * (n - CHUNK) * 2 * HEADS * DIM * 4
        params = transfer_params(prompt, "second", MODEL, layout.compat_hash(MODEL), CHUNK, LAYERS, 0, HEADS,
                                 daemon.address, "shm")
        ps = PullState(params, blocks, fetch_first_token=False)
        settled = threading.Event()
        pull.start(ps, time.monotonic() + 30, lambda s: settled.set())
        assert settled.wait(30) and ps.phase is PullPhase.DONE, ps.failure
        assert torch.equal(_tokens(layout, src, blocks, n), _tokens(layout, dst, blocks, n))
    finally:
        pub.close()
        pull.close()


def test_publisher_thread_survives_a_failing_job(daemon):
    """A bug in one job (here the engine's ``done`` callback raising) must not kill the publisher thread:
    the next request is still published and settles (else every later publish would hang to its deadline)."""
    layout = _layout(16)
    src, _ = _cache(layout, seed=6)
    pub = LayerPublisher(_client(daemon, layout), daemon.address, "shm", chunk_tokens=CHUNK)
    pub.bind(src)

    def boom(_state) -> None:
        raise RuntimeError("a bug in the engine's callback")

    try:
        first = pub.begin([PublishRequest("boom", list(range(7000, 7000 + CHUNK)), [0, 1, 2, 3], first_token=False)])
        pub.end(first, [None], boom)
        second = pub.begin([PublishRequest("after", list(range(8000, 8000 + CHUNK)), [4, 5, 6, 7],
                                           first_token=False)])
        done = threading.Event()
        pub.end(second, [None], lambda s: done.set())
        assert done.wait(30) and second[0].phase is PublishPhase.COMMITTED
        assert pub._thread.is_alive()
    finally:
        pub.close()


def test_first_token_pulled_from_the_store_when_params_lack_it(daemon):
    layout = _layout(16)
    src, _ = _cache(layout, seed=2)
    dst, _ = _cache(layout, seed=None)
    prompt = list(range(5, 5 + 40))
    pub = LayerPublisher(_client(daemon, layout), daemon.address, "shm", chunk_tokens=CHUNK)
    pull = LayerPuller(_client(daemon, layout), daemon.address)
    pub.bind(src)
    pull.bind(dst)
    try:
        states = pub.begin([PublishRequest("req-ft", prompt, [0, 1, 2])])
        # what a decode leg sent before the prefill answered knows: the prompt, not the first token
        params = transfer_params(prompt, "req-ft", MODEL, layout.compat_hash(MODEL), CHUNK, LAYERS, 0, HEADS,
                                 daemon.address, "shm")
        assert params.first_token is None
        done = threading.Event()
        ps = PullState(params, [5, 6, 7], skip_tokens=16)  # the first block is "already cached"
        pull.start(ps, time.monotonic() + 30, lambda s: done.set())
        for layer in range(LAYERS):
            pub.layer_done(layer)
        pub.end(states, [77], lambda s: None)
        assert done.wait(30) and ps.failure is None
        assert ps.first_token == 77
        assert torch.equal(_tokens(layout, src, [0, 1, 2], 40)[:, :, 16:], _tokens(layout, dst, [5, 6, 7], 40)[:, :, 16:])
        # skipped tokens were not written
        assert _tokens(layout, dst, [5, 6, 7], 16).abs().sum() == 0
    finally:
        pub.close()
        pull.close()


def test_pull_deadline_fails_with_timeout_code_and_layers_report_progress(daemon):
    layout = _layout(16)
    dst, _ = _cache(layout, seed=None)
    params = transfer_params(list(range(900, 940)), "never-published", MODEL, layout.compat_hash(MODEL), CHUNK,
                             LAYERS, 0, HEADS, daemon.address, "shm", first_token=1)
    pull = LayerPuller(_client(daemon, layout), daemon.address)
    pull.bind(dst)
    try:
        ps = PullState(params, [0, 1, 2])
        got: list[PullState] = []
        done = threading.Event()
        pull.start(ps, time.monotonic() + 0.5, lambda s: (got.append(s), done.set()))
        assert ps.wait_layer(0, timeout=20) is False  # settled without layer 0
        assert done.wait(20) and got == [ps]
        assert ps.phase is PullPhase.FAILED and ps.failure is not None
        assert ps.failure.code is FailureCode.TIMEOUT and str(ps.failure).startswith("timeout: ")
    finally:
        pull.close()


def test_pull_mismatch_and_cancel_are_typed(daemon):
    layout = _layout(16)
    dst, _ = _cache(layout, seed=None)
    pull = LayerPuller(_client(daemon, layout), daemon.address)
    pull.bind(dst)
    try:
        wrong_layers = transfer_params([1, 2, 3], "r1", MODEL, layout.compat_hash(MODEL), CHUNK, LAYERS + 1, 0,
                                       HEADS, daemon.address, "shm", first_token=1)
        done = threading.Event()
        ps = PullState(wrong_layers, [0])
        pull.start(ps, time.monotonic() + 10, lambda s: done.set())
        assert done.wait(20)
        assert ps.failure is not None and ps.failure.code is FailureCode.MISMATCH and "4 layers" in ps.failure.message
        params = transfer_params([1, 2, 3], "r2", MODEL, layout.compat_hash(MODEL), CHUNK, LAYERS, 0, HEADS,
                                 daemon.address, "shm", first_token=1)
        cancelled = PullState(params, [0])
        cancelled.cancel()
        done.clear()
        pull.start(cancelled, time.monotonic() + 10, lambda s: done.set())
        assert done.wait(20)
        assert cancelled.failure is not None and cancelled.failure.code is FailureCode.ABORTED
    finally:
        pull.close()


def test_refused_reservation_and_prefill_abort_reach_a_waiting_decode(daemon):
    layout = _layout(16, num_blocks=4096)
    src, reg = _cache(layout, seed=3)
    dst, _ = _cache(_layout(16), seed=None)
    pub = LayerPublisher(_client(daemon, layout), daemon.address, "shm", chunk_tokens=CHUNK)
    pull = LayerPuller(_client(daemon, _layout(16)), daemon.address)
    pub.bind(src)
    pull.bind(dst)
    try:
        huge = list(range(40000))  # 3 layers x 40k tokens x 256 B = 30 MiB ... x4 requests > 64 MiB pool
        states = pub.begin([PublishRequest(f"big-{i}", [i] + huge, list(range(2501))) for i in range(4)])
        refused = [s for s in states if s.phase is PublishPhase.REFUSED]
        assert refused and all(s.failure is not None and s.failure.code is FailureCode.STORE_FULL for s in refused)
        assert _value(reg, "test_publish_errors_total", {"reason": "full"}) == len(refused)
        pub.end(states, [0] * len(states), lambda s: None)
        # a decode waiting for a refused request's chunks learns at once (aborted), not at its deadline
        ps = PullState(refused[0].params, list(range(8)))
        done = threading.Event()
        t0 = time.monotonic()
        pull.start(ps, time.monotonic() + 30, lambda s: done.set())
        assert done.wait(20) and time.monotonic() - t0 < 10
        assert ps.failure is not None and ps.failure.code is FailureCode.ABORTED
    finally:
        pub.close()
        pull.close()


def test_failure_codes_of_exceptions():
    assert FailureCode.of(TimeoutError("x")) is FailureCode.TIMEOUT
    assert FailureCode.of(StoreFullError("x", "full")) is FailureCode.STORE_FULL
    assert FailureCode.of(StoreError("x", "aborted")) is FailureCode.ABORTED
    assert FailureCode.of(StoreError("x", "corrupt")) is FailureCode.CORRUPT
    assert FailureCode.of(StoreError("x", "closed")) is FailureCode.UNAVAILABLE
    assert FailureCode.of(StoreError("x", "bad_request")) is FailureCode.REFUSED
    assert FailureCode.of(ConnectionResetError()) is FailureCode.UNAVAILABLE
    assert FailureCode.of(TransferError(FailureCode.MISMATCH, "m")) is FailureCode.MISMATCH
    assert FailureCode.of(KeyError("k")) is FailureCode.INTERNAL
    from kvrelay.transfer.base import HandshakeError, TransferError as TransportError
    assert FailureCode.of(TransportError("peer 'kvrelay-store' (pid 1) exited")) is FailureCode.UNAVAILABLE
    assert FailureCode.of(HandshakeError("compatibility hash mismatch")) is FailureCode.MISMATCH
    f = TransferFailure.from_exception(TimeoutError("no chunk"), "pulling")
    assert str(f) == "timeout: pulling: no chunk"


def test_connector_imports_no_engine():
    import subprocess
    import sys
    # the store's error codes (kvrelay.store.errors: an enum, no daemon or client code) are the one exception
    code = ("import sys, kvrelay.connector; "
            "bad = [m for m in sys.modules if m.startswith('kvrelay.engines') or m.startswith('kvrelay.store') "
            "and m not in ('kvrelay.store', 'kvrelay.store.errors')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
