"""A decode pulls each request from the store its params name (a store on every host, issue 23): its own
store over shm, another host's over tcp through `StoreClients`, against real `kvrelay store` daemons on
127.0.0.1.  The two stores hold *different* KV under the *same* chunk keys, so a pull from the wrong store
fails the byte comparison.  Also: an unknown store is refused, a dead peer store fails only its own pulls
(and at once after the first), and the clients to other stores stay within their bound."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import torch
from prometheus_client import CollectorRegistry

from kvrelay.connector import (
    EngineCache, FailureCode, LayerPublisher, LayerPuller, PublishRequest, PullPhase, PullState, TransferMetrics)
from kvrelay.connector.stores import StoreClients
from kvrelay.kernels.layout import KVLayout
from kvrelay.params import KVTransferParams
from kvrelay.store.client import StoreClient
from kvrelay.store.process import DaemonProcess
from waiting import wait_until

MODEL = "peer-stores-test-model"
LAYERS, HEADS, DIM, CHUNK, BLOCK = 2, 2, 16, 64, 16
N = 100  # one full chunk and a partial one
PROMPT = list(range(500, 500 + N))
BLOCKS = list(range(3, 3 + -(-N // BLOCK)))


def _layout() -> KVLayout:
    return KVLayout(num_layers=LAYERS, num_blocks=32, block_size=BLOCK, num_kv_heads=HEADS, head_dim=DIM,
                    dtype=torch.float32, kv_fused=True)


COMPAT = _layout().compat_hash(MODEL)


def _cache(seed: int | None) -> EngineCache:
    layout = _layout()
    layers = layout.allocate()
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        for t in layers:
            assert isinstance(t, torch.Tensor)
            t.copy_(torch.randn(t.shape, generator=g))
    return EngineCache(layout, layers, MODEL, COMPAT, "epoch-1", TransferMetrics(CollectorRegistry(), "test"))


def _kv(cache: EngineCache) -> torch.Tensor:
    """The KV of the prompt's N tokens, every layer (NHD, K/V fused: [2, blocks, block, heads, dim])."""
    return torch.stack([t[:, BLOCKS].reshape(2, -1, HEADS, DIM)[:, :N] for t in cache.layers
                        if isinstance(t, torch.Tensor)])


def _client(daemon: DaemonProcess, transport: str = "shm") -> StoreClient:
    return StoreClient(daemon.address, transport=transport, compat_hash=COMPAT, staging_bytes=8 << 20, timeout=3.0)


def _publish(daemon: DaemonProcess, seed: int, request_id: str, prompt: list[int] = PROMPT
             ) -> tuple[KVTransferParams, torch.Tensor]:
    """Publish ``prompt``'s KV of a cache seeded ``seed`` into ``daemon``'s store: its params and the KV (a
    store keeps the first KV published under a chunk key: each test's prompts are its own)."""
    src = _cache(seed)
    pub = LayerPublisher(_client(daemon), daemon.address, "shm", chunk_tokens=CHUNK)
    pub.bind(src)
    try:
        states = pub.begin([PublishRequest(request_id, prompt, BLOCKS)])
        for layer in range(LAYERS):
            pub.layer_done(layer)
        published = threading.Event()
        pub.end(states, [7], lambda s: published.set())
        assert published.wait(30) and states[0].failure is None
        return states[0].params, _kv(src)
    finally:
        pub.close()


def _pull(puller: LayerPuller, params: KVTransferParams, timeout: float = 10.0) -> tuple[PullState, torch.Tensor]:
    dst = _cache(None)
    puller._cache = dst  # a fresh destination per pull (bind() would also watch the breaker's metrics again)
    done = threading.Event()
    state = PullState(params, BLOCKS)
    puller.start(state, time.monotonic() + timeout, lambda s: done.set())
    assert done.wait(timeout + 20), "the pull never settled"
    return state, _kv(dst)


@pytest.fixture(scope="module")
def stores():
    """Three stores as three hosts would run them: "a" (this decode's own), "b" and "c" (other hosts')."""
    ds = {}
    try:
        for name in "abc":
            ds[name] = DaemonProcess(pool_size="32MiB", transports="shm,tcp").start()
        yield ds
    finally:
        for d in ds.values():
            d.stop()


def _puller(stores: dict[str, DaemonProcess], peers: list[str]) -> LayerPuller:
    p = LayerPuller(_client(stores["a"]), stores["a"].address, peers=[stores[n].address for n in peers],
                    make=lambda address: StoreClient(address, transport="tcp", compat_hash=COMPAT,
                                                     staging_bytes=8 << 20, timeout=3.0))
    p.bind(_cache(None))
    return p


def test_each_pull_comes_from_the_store_its_params_name(stores):
    # the same prompt, so the same chunk keys, in two stores with other KV: a pull from the wrong one differs
    own_params, own_kv = _publish(stores["a"], seed=1, request_id="req-own")
    far_params, far_kv = _publish(stores["b"], seed=2, request_id="req-far")
    assert own_params.block_hashes == far_params.block_hashes and not torch.equal(own_kv, far_kv)
    puller = _puller(stores, ["b"])
    try:
        for params, want in ((far_params, far_kv), (own_params, own_kv), (far_params, far_kv)):
            state, got = _pull(puller, params)
            assert state.phase is PullPhase.DONE and state.failure is None, state.failure
            assert torch.equal(got, want), f"pulled other KV than store {params.store_address} holds"
            assert state.first_token == 7
        assert puller.stores.pulls(stores["b"].address) == 2 and puller.stores.made == 1  # one client, kept
        assert puller.stores.open_addresses() == [stores["b"].address]
    finally:
        puller.close()


def test_a_store_nobody_configured_is_refused_by_name(stores):
    params, _ = _publish(stores["c"], seed=3, request_id="req-unknown", prompt=[3] * N)
    puller = _puller(stores, ["b"])  # c is not one of its peers
    try:
        state, _ = _pull(puller, params)
        assert state.failure is not None and state.failure.code is FailureCode.MISMATCH
        assert stores["c"].address in state.failure.message and "--peer-store" in state.failure.message
        assert puller.stores.made == 0  # nothing reached it
    finally:
        puller.close()
    alone = LayerPuller(_client(stores["a"]), stores["a"].address)  # no peers at all: only its own store
    alone.bind(_cache(None))
    try:
        state, _ = _pull(alone, params)
        assert state.failure is not None and state.failure.code is FailureCode.MISMATCH
    finally:
        alone.close()


def test_clients_to_other_stores_stay_within_their_bound(stores):
    b_params, b_kv = _publish(stores["b"], seed=4, request_id="req-b", prompt=[4] * N)
    c_params, c_kv = _publish(stores["c"], seed=5, request_id="req-c", prompt=[5] * N)
    puller = _puller(stores, ["b", "c"])
    puller.stores.limit = 1
    try:
        for params, want, address in ((b_params, b_kv, "b"), (c_params, c_kv, "c"), (b_params, b_kv, "b")):
            state, got = _pull(puller, params)
            assert state.failure is None and torch.equal(got, want)
            assert puller.stores.open_addresses() == [stores[address].address]
        assert puller.stores.made == 3  # b's client was closed for c's, and made again
    finally:
        puller.close()


def test_a_dead_peer_store_fails_only_its_own_pulls(stores):
    """Last in this module: it kills store c."""
    own_params, own_kv = _publish(stores["a"], seed=6, request_id="req-own-2", prompt=[6] * N)
    c_params, c_kv = _publish(stores["c"], seed=7, request_id="req-c-2", prompt=[7] * N)
    puller = _puller(stores, ["b", "c"])
    try:
        state, got = _pull(puller, c_params)
        assert state.failure is None and torch.equal(got, c_kv)
        stores["c"].stop(signal.SIGKILL)
        t0 = time.monotonic()
        state, _ = _pull(puller, c_params, timeout=30.0)
        assert state.failure is not None, "a pull from a dead store succeeded"
        assert state.failure.code is FailureCode.UNAVAILABLE, state.failure
        took = time.monotonic() - t0
        print(f"\npull from a killed store: {state.failure} after {took:.2f}s (client timeout 3 s, deadline 30 s)")
        assert took < 5, "the pull from the dead store waited for it (its refused connection says it is gone)"
        breaker = puller.stores.breaker(stores["c"].address)
        assert breaker is not None and not breaker.allow()  # open: the next pulls from c skip it at once
        t0 = time.monotonic()
        state, _ = _pull(puller, c_params)
        assert state.failure is not None and state.failure.code is FailureCode.UNAVAILABLE
        assert time.monotonic() - t0 < 1.0
        state, got = _pull(puller, own_params)  # its own store (and b) serve on
        assert state.failure is None and torch.equal(got, own_kv)
    finally:
        puller.close()


def test_store_clients_refuse_bad_setups():
    with pytest.raises(ValueError, match="limit 0"):
        StoreClients(None, "tcp://127.0.0.1:1", limit=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="factory"):
        StoreClients(None, "tcp://127.0.0.1:1", peers=["tcp://127.0.0.1:2"])  # type: ignore[arg-type]


def test_a_pull_waiting_in_a_peer_store_that_dies_fails_at_once():
    """In flight: the prefill published layer 0 only, the decode's pull waits in the store for layer 1, and the
    store is killed: the pull fails UNAVAILABLE at once (the engine recomputes), not at its deadline."""
    own = DaemonProcess(pool_size="32MiB", transports="shm,tcp").start()
    far = DaemonProcess(pool_size="32MiB", transports="shm,tcp").start()
    src = _cache(8)
    pub = LayerPublisher(_client(far), far.address, "shm", chunk_tokens=CHUNK)
    pub.bind(src)
    puller = _puller({"a": own, "b": far}, ["b"])
    try:
        states = pub.begin([PublishRequest("req-inflight", [8] * N, BLOCKS)])
        pub.layer_done(0)  # layer 1 never comes: the pull parks in the store
        puller._cache = _cache(None)
        done = threading.Event()
        state = PullState(states[0].params, BLOCKS)
        puller.start(state, time.monotonic() + 60, lambda s: done.set())
        wait_until(lambda: state.layers_done >= 1, 30, "layer 0 pulled")
        t0 = time.monotonic()
        far.stop(signal.SIGKILL)
        assert done.wait(30), "the pull never settled"
        took = time.monotonic() - t0
        print(f"\npull waiting in a killed store: {state.failure} after {took:.2f}s (deadline 60 s)")
        assert state.failure is not None and state.failure.code is FailureCode.UNAVAILABLE, state.failure
        assert took < 5
    finally:
        puller.close()
        pub.close()
        own.stop()
        far.stop()
