"""The vLLM connector with a store on every host (issue 23), without a vLLM server: its settings name the
other hosts' stores; a decode leg's ``store_address`` (the router's light params, or the prefill's own answer
in vLLM's sequential proxy flow) makes the scheduler's load name that store; and the worker side pulls it
from there, against two real `kvrelay store` daemons holding *different* KV under the same chunk keys."""

from __future__ import annotations

import threading

import pytest
import torch
from prometheus_client import CollectorRegistry

from kvrelay.connector import EngineCache, LayerPublisher, PublishRequest, TransferMetrics
from kvrelay.engines.vllm.config import ConfigError, RelayConfig, vllm_kv_transfer_config
from kvrelay.engines.vllm.meta import LoadSpec, StepMeta
from kvrelay.engines.vllm.scheduler import SchedulerSide
from kvrelay.engines.vllm.worker import WorkerSide
from kvrelay.kernels.layout import KVLayout
from kvrelay.params import DO_REMOTE_PREFILL, RELAY_ID, STORE_ADDRESS
from kvrelay.store.client import StoreClient
from kvrelay.store.process import DaemonProcess
from waiting import wait_until

MODEL = "vllm-peer-stores-model"
OWN, FAR = "tcp://127.0.0.1:5611", "tcp://127.0.0.1:5612"
LAYERS, HEADS, DIM, BLOCK, N = 2, 2, 16, 32, 300
PROMPT = list(range(7, 7 + N))
BLOCKS = list(range(2, 2 + -(-N // BLOCK)))


def _cfg(store: str = OWN, **extra) -> RelayConfig:
    return RelayConfig.parse("kv_both", {"store": store, **extra}, "recompute", MODEL, BLOCK)


def test_settings_name_the_other_hosts_stores():
    config = vllm_kv_transfer_config(OWN, "shm", peer_stores=(FAR,), remote_transport="tcp")
    assert config is not None
    cfg = RelayConfig.parse("kv_both", config["kv_connector_extra_config"], "recompute", MODEL, BLOCK)
    assert cfg.peer_stores == (FAR,) and cfg.remote_transport == "tcp" and cfg.transport == "shm"
    plain = vllm_kv_transfer_config(OWN, "shm")
    assert plain is not None and "peer_stores" not in plain["kv_connector_extra_config"]
    with pytest.raises(ConfigError, match="peer_stores must be a list of store addresses"):
        _cfg(peer_stores="tcp://127.0.0.1:1")
    with pytest.raises(ConfigError, match="remote_transport 'shm'"):
        _cfg(peer_stores=[FAR], remote_transport="shm")


class _Alive:
    """The scheduler's own-store client as far as a decode leg needs it: it answers pings."""

    def ping(self) -> None:
        pass


def test_a_decode_leg_loads_from_the_store_it_names():
    sched = SchedulerSide(_cfg(), "compat", LAYERS, HEADS, BLOCK, _Alive)  # type: ignore[arg-type]
    named = {DO_REMOTE_PREFILL: True, RELAY_ID: "rel-1", STORE_ADDRESS: FAR}
    for req_id, params in (("a", named), ("b", {DO_REMOTE_PREFILL: True, RELAY_ID: "rel-2"})):
        offer, is_async = sched.matched_tokens(req_id, PROMPT, params, 0)
        assert offer == N and is_async
        sched.after_alloc(req_id, BLOCKS, offer)
    loads = sched.build_meta([], lambda rid: BLOCKS).loads
    assert [(spec.req_id, spec.store) for spec in loads] == [("a", FAR), ("b", "")]


def _layout() -> KVLayout:
    return KVLayout(num_layers=LAYERS, num_blocks=16, block_size=BLOCK, num_kv_heads=HEADS, head_dim=DIM,
                    dtype=torch.float32, kv_fused=True)


def _cache(seed: int | None, metrics: TransferMetrics | None = None) -> EngineCache:
    layout = _layout()
    layers = layout.allocate()
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        for t in layers:
            assert isinstance(t, torch.Tensor)
            t.copy_(torch.randn(t.shape, generator=g))
    return EngineCache(layout, layers, MODEL, layout.compat_hash(MODEL), "epoch",
                       metrics or TransferMetrics(CollectorRegistry(), "test"))


def _kv(cache: EngineCache) -> torch.Tensor:
    return torch.stack([t[:, BLOCKS].reshape(2, -1, HEADS, DIM)[:, :N] for t in cache.layers
                        if isinstance(t, torch.Tensor)])


def _publish(daemon: DaemonProcess, seed: int) -> tuple[list[str], torch.Tensor]:
    src = _cache(seed)
    pub = LayerPublisher(StoreClient(daemon.address, transport="shm", compat_hash=src.compat_hash,
                                     staging_bytes=8 << 20), daemon.address, "shm", chunk_tokens=256)
    pub.bind(src)
    try:
        states = pub.begin([PublishRequest("rel-1", PROMPT, BLOCKS)])
        for layer in range(LAYERS):
            pub.layer_done(layer)
        done = threading.Event()
        pub.end(states, [1], lambda s: done.set())
        assert done.wait(30) and states[0].failure is None
        return states[0].params.block_hashes, _kv(src)
    finally:
        pub.close()


@pytest.mark.timeout(120)
def test_the_worker_pulls_from_the_named_store_not_its_own():
    own, far = (DaemonProcess(pool_size="32MiB", transports="shm,tcp").start() for _ in range(2))
    try:
        hashes, own_kv = _publish(own, seed=1)
        far_hashes, far_kv = _publish(far, seed=2)  # the same prompt: the same chunk keys, other KV
        assert hashes == far_hashes and not torch.equal(own_kv, far_kv)
        compat = _layout().compat_hash(MODEL)
        cfg = _cfg(own.address, peer_stores=[far.address], remote_transport="tcp", model_id=MODEL)
        caches: list[EngineCache] = []

        def cache_factory(metrics: TransferMetrics) -> EngineCache:
            caches.append(_cache(None, metrics))
            return caches[-1]
        worker = WorkerSide(cfg, cache_factory,
                            lambda: StoreClient(own.address, transport="shm", compat_hash=compat),
                            lambda address: StoreClient(address, transport="tcp", compat_hash=compat))
        try:
            for store, want in ((far.address, far_kv), ("", own_kv)):
                worker.bind(StepMeta(loads=[LoadSpec("req", "rel-1", hashes, N, BLOCKS, 0, 10.0, store)]))
                worker.start_loads()
                wait_until(lambda: "req" in worker.finished(set())[1], 30, "the load to settle")
                assert worker.load_errors() == set()
                assert torch.equal(_kv(caches[0]), want), f"pulled other KV than store {store or 'own'} holds"
        finally:
            worker.close()
        caches.clear()
        alone = WorkerSide(_cfg(own.address, model_id=MODEL), cache_factory,  # no peer_stores: one store, its own
                           lambda: StoreClient(own.address, transport="shm", compat_hash=compat))
        try:
            alone.bind(StepMeta(loads=[LoadSpec("req", "rel-1", hashes, N, BLOCKS, 0, 10.0, far.address)]))
            alone.start_loads()
            wait_until(lambda: "req" in alone.finished(set())[1], 30, "the load to settle")
            assert alone.load_errors() == set() and torch.equal(_kv(caches[0]), own_kv)
        finally:
            alone.close()
    finally:
        own.stop()
        far.stop()
