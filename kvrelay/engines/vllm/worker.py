"""The worker-side half of the vLLM connector (vLLM's Worker process): runs the loads and saves the
scheduler side asked for, with `kvrelay.connector`'s `LayerPuller` and `LayerPublisher`.

- ``bind(meta)`` (before the forward pass): reserve this step's saves in the store.
- ``start_loads()``: each load is pulled on a worker thread, layer by layer, into the request's blocks
  (the request is not scheduled until it is reported, so no forward pass reads them meanwhile).
- ``save_layer(i)`` (inside the forward pass): hand layer i to the publisher thread and return.
  A request vLLM aborted while it was saved (``meta.aborted``, from the scheduler side's
  ``request_finished``) publishes no further layer and gives its store reservation back at once
  (`LayerPublisher.abort`); it is still reported in finished_sending once settled.
- ``end_step()``: the publisher settles this step's requests after their last layer.
- ``finished(...)``: loads that settled (a failed one's blocks go to ``load_errors()``, and vLLM
  recomputes them), and finished requests whose publish settled (their blocks are freed then).  A
  request that finished while loading (vLLM aborted it) has its pull cancelled, and a wait for it in the
  store ended at once (`LayerPuller.cancel`): vLLM frees its blocks when the load reports settled.
- ``preempted(...)``: blocks of a preempted request are reused at once, so wait for the publisher first.

Owns: the per-request transfer state of this worker.  Must not touch: vLLM's scheduling.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Callable, Sequence

from prometheus_client import CollectorRegistry

from kvrelay.connector import (
    CircuitBreaker, EngineCache, LayerPublisher, LayerPuller, PublishPhase, PublishRequest, PublishState, PullState,
    TransferMetrics)
from kvrelay.connector.heads import HeadSlices
from kvrelay.engines.vllm.config import RelayConfig
from kvrelay.engines.vllm.meta import LoadSpec, StepMeta
from kvrelay.params import KVTransferParams

log = logging.getLogger("kvrelay.vllm.worker")
DRAIN_TIMEOUT_S = 30.0
# counted by the first TP rank only (every rank moves its share of the request): the bytes and failures are per rank
_PER_REQUEST = frozenset({"published_requests", "loads_ok", "loaded_tokens"})


class WorkerSide:
    def __init__(self, cfg: RelayConfig, cache_factory: Callable[[TransferMetrics], EngineCache],
                 client_factory: Callable[[], object], peer_factory: Callable[[str], object] | None = None, *,
                 heads: HeadSlices | None = None, publishes_heads: bool = True, counts_requests: bool = True) -> None:
        """``peer_factory(address)``: a client of another host's store (``cfg.peer_stores``); ``heads``: the
        model's KV heads in the slices this engine publishes (tensor parallelism), ``publishes_heads`` False where
        another rank publishes this rank's (replicated) heads; ``counts_requests`` False (TP ranks but the first):
        this rank counts bytes and failures, not requests and tokens (vLLM sums the ranks' counts)."""
        self.cfg = cfg
        self.registry = CollectorRegistry()
        self.metrics = TransferMetrics(self.registry, "kvrelay_vllm")
        self.cache = cache_factory(self.metrics)
        self.breaker = CircuitBreaker("kvrelay store (worker)", cfg.breaker_cooldown_s,
                                      probe=lambda: self._ping(client_factory))
        self.publisher: LayerPublisher | None = None
        self.puller: LayerPuller | None = None
        if cfg.publishes:
            self.publisher = LayerPublisher(client_factory(), cfg.store, cfg.transport,  # type: ignore[arg-type]
                                            chunk_tokens=cfg.chunk_tokens, reserve_ttl=cfg.reserve_ttl_s,
                                            breaker=self.breaker, heads=heads, publishes_heads=publishes_heads)
            self.publisher.bind(self.cache)
        if cfg.loads:
            self.puller = LayerPuller(client_factory(), cfg.store, breaker=self.breaker,  # type: ignore[arg-type]
                                      peers=cfg.peer_stores, make=peer_factory)  # type: ignore[arg-type]
            self.puller.bind(self.cache)
        self._lock = threading.Lock()
        self._meta = StepMeta()
        self._step: list[PublishState] = []
        self._saves: dict[str, list[PublishState]] = {}  # req_id -> its publishes not yet reported
        self._finished: set[str] = set()  # finished requests whose publish may still run
        self._loads: dict[str, tuple[LoadSpec, PullState]] = {}
        self._settled: list[str] = []  # loads settled since the last report (from puller threads)
        self._errors: set[int] = set()
        self.counts: dict[str, int] = {}
        self._per_request = counts_requests

    # ---- per step ---------------------------------------------------------------------------------------
    def bind(self, meta: StepMeta) -> None:
        self._meta = meta
        self._step = []
        if self.publisher is not None:  # vLLM aborted them while they were saved: stop, release the store's slots
            for relay_id in meta.aborted:  # counted in publish_failures once they settle (FAILED, aborted)
                self.publisher.abort(relay_id, f"vLLM aborted request {relay_id} while it was published")
        if meta.saves and self.publisher is not None:
            reqs = [PublishRequest(s.relay_id, s.token_ids, s.block_ids, first_token=False,
                                   stored_tokens=s.stored_tokens, cache_salt=s.cache_salt) for s in meta.saves]
            self._step = self.publisher.begin(reqs)
            for spec, state in zip(meta.saves, self._step, strict=True):
                self._saves.setdefault(spec.req_id, []).append(state)
                if state.phase is PublishPhase.REFUSED:
                    self._count("publish_failures")

    def start_loads(self) -> None:
        loads, self._meta.loads = self._meta.loads, []
        if self.puller is None:
            return
        layout = self.cache.layout
        for spec in loads:
            kp = KVTransferParams(request_id=spec.relay_id, model_id=self.cache.model_id,
                                  compat_hash=self.cache.compat_hash, num_tokens=spec.num_tokens,
                                  chunk_tokens=self.cfg.chunk_tokens,
                                  block_hashes=spec.block_hashes[:-(-spec.num_tokens // self.cfg.chunk_tokens)],
                                  num_layers=layout.num_layers, head_start=0, head_end=layout.total_kv_heads,
                                  head_slices=spec.head_slices, store_address=self._store_of(spec),
                                  transport=self.cfg.transport)
            state = PullState(kp, spec.block_ids, skip_tokens=spec.skip_tokens, fetch_first_token=False)
            self._loads[spec.req_id] = (spec, state)
            self.puller.start(state, time.monotonic() + spec.deadline_s,
                              functools.partial(self._on_loaded, spec.req_id))

    def save_layer(self, layer: int) -> None:
        if self._step and self.publisher is not None:
            self.publisher.layer_done(layer)

    def end_step(self) -> None:
        step, self._step = self._step, []
        if step and self.publisher is not None:
            self.publisher.end(step, [None] * len(step), lambda _s: None)

    def preempted(self, req_ids: Sequence[str]) -> None:
        if self.publisher is not None and any(r in self._saves for r in req_ids):
            if not self.publisher.drain(DRAIN_TIMEOUT_S):
                log.error("the publisher did not finish within %ss before preempted blocks are reused",
                          DRAIN_TIMEOUT_S)

    def finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        """(finished_sending, finished_recving) for vLLM's get_finished."""
        self._finished |= finished_req_ids & set(self._saves)
        for req_id in finished_req_ids:  # aborted while loading: stop pulling (reported once settled)
            entry = self._loads.get(req_id)
            if entry is not None and self.puller is not None and not entry[1].cancelled:
                self.puller.cancel(entry[1], f"vLLM request {req_id} ended while loading")
        sending = set()
        for req_id in list(self._finished):
            states = self._saves[req_id]
            if not any(s.holds_blocks for s in states):
                sending.add(req_id)
                self._finished.discard(req_id)
                del self._saves[req_id]
                self._count("published_requests", sum(s.phase is PublishPhase.COMMITTED for s in states))
                self._count("publish_failures", sum(s.phase is PublishPhase.FAILED for s in states))
                self._count("published_bytes", sum(s.committed_bytes for s in states))
        with self._lock:
            settled, self._settled = self._settled, []
        recving = set()
        bs = self.cache.layout.block_size
        for req_id in settled:
            spec, state = self._loads.pop(req_id)
            recving.add(req_id)
            if state.failure is None:
                self._count("loads_ok")
                self._count("loaded_tokens", spec.num_tokens - spec.skip_tokens)
                self._count("pulled_bytes", state.pulled_bytes)
            else:
                log.warning("load of %s failed (%s): vLLM recomputes it", req_id, state.failure)
                self._count("loads_failed")
                self._errors.update(spec.block_ids[spec.skip_tokens // bs:-(-spec.num_tokens // bs)])
        return sending, recving

    def load_errors(self) -> set[int]:
        errors, self._errors = self._errors, set()
        return errors

    def take_counts(self) -> dict[str, int]:
        counts, self.counts = self.counts, {}
        if self.breaker.skipped:
            counts["store_skipped"] = self.breaker.skipped
            self.breaker.skipped = 0
        return counts

    def close(self) -> None:
        self.breaker.close()
        for hook in (self.publisher, self.puller):
            if hook is not None:
                hook.close()

    # ---- helpers -------------------------------------------------------------------------------------------
    def _store_of(self, spec: LoadSpec) -> str:
        """The store a load pulls from: the one its decode leg names (its prefill's) when this instance knows
        other hosts' stores (``peer_stores``; one it does not know fails the load, MISMATCH); with none, its own
        (a single store, however its prefill spelled the address, as before stores per host)."""
        return spec.store if spec.store and self.cfg.peer_stores else self.cfg.store

    @staticmethod
    def _ping(client_factory: Callable[[], object]) -> None:
        client = client_factory()
        try:
            client.ping()  # type: ignore[attr-defined]
        finally:
            client.close()  # type: ignore[attr-defined]

    def _on_loaded(self, req_id: str, state: PullState) -> None:
        with self._lock:
            self._settled.append(req_id)

    def _count(self, key: str, value: int = 1) -> None:
        if value and (self._per_request or key not in _PER_REQUEST):
            self.counts[key] = self.counts.get(key, 0) + value
