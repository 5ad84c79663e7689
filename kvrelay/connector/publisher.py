"""Prefill side: publish each layer's KV to the store while the next layer computes.

Owns: `LayerPublisher`.  Before a forward pass (`begin`) it computes each publishing request's content
addresses and reserves every (layer, chunk) in the store in one call; after a layer's KV is written
(`layer_done`, called from inside the forward pass) it hands that layer to the publisher thread, which
packs each chunk straight into its pool slot (`kvrelay.kernels.pack`), checksums it and commits it, one
flush per layer; the forward pass computes on.  After sampling (`end`) the first tokens are published and
each request settles (COMMITTED or FAILED) and is handed to ``done``: from then on the publisher reads
none of its blocks.  With ``layerwise=False`` (the baseline other KV layers use) every layer is published
only after the whole forward pass.

A request aborted while it is published (`abort`, from any thread: its client left during the prefill,
issue 26) publishes no further layer: the publisher thread fails it (ABORTED), tells the store (pulls
waiting for it fail now) and releases its reserved chunks at once, instead of letting them drain layer
by layer with the forward pass or wait for the reservation's TTL.  Chunks already committed stay (they
are a prefix anyone may reuse).  The release runs on the publisher thread, the only writer of the
reserved slots, so no slot is freed while it is being packed.

Engine-independent: it works from an `EngineCache` (layout, cache tensors, model identity), block ids
and a callback.  Must not touch: the engine's scheduling or the cache contents.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from kvrelay.connector.addressing import (
    FIRST_TOKEN_BYTES, chunk_jobs, first_token_header, first_token_key, first_token_payload, transfer_params)
from kvrelay.connector.binding import EngineCache
from kvrelay.connector.messages import (
    AbortPublish, Drain, FinishBatch, PublisherJob, PublishLayer, StopPublisher)
from kvrelay.connector.breaker import CircuitBreaker
from kvrelay.connector.heads import HeadSlices
from kvrelay.connector.threads import quiet_torch_thread
from kvrelay.connector.state import FailureCode, PublishPhase, PublishState, TransferFailure
from kvrelay.keys import ChunkKey
from kvrelay.kernels.layout import dtype_name
from kvrelay.transfer.wire import ChunkHeader, checksum

log = logging.getLogger("kvrelay.connector.publish")


class PublishClient(Protocol):
    """The part of `kvrelay.store.client.StoreClient` a publisher uses."""

    def reserve(self, request_id: str, chunks: list[tuple[ChunkKey, int]], ttl: float = ...,
                tenant: str = ..., tokens: Sequence[int] = ...) -> None: ...
    def publish_buffer(self, key: ChunkKey) -> torch.Tensor: ...
    def commit(self, key: ChunkKey, header: ChunkHeader, *, wait: bool = ...) -> None: ...
    def flush(self) -> None: ...
    def abort(self, request_id: str, reason: str) -> int: ...
    def release(self, request_id_or_keys: str | Sequence[ChunkKey]) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class PublishRequest:
    request_id: str
    prompt: Sequence[int]  # the tokens whose KV is published
    block_ids: list[int]  # the engine's blocks holding them (read until the request settles)
    first_token: bool = True  # also publish the sampled first token (engines whose decode recomputes it: no)
    stored_tokens: int = 0  # the prompt's first tokens are already in the store (loaded from it): chunks that
    #                         end within them are not packed or sent again
    cache_salt: str = ""  # the request's tenant salt: in its chunks' addresses, and its chunks' owner in the store


class LayerPublisher:
    def __init__(self, client: PublishClient, store_address: str, transport: str, *, chunk_tokens: int,
                 layerwise: bool = True, reserve_ttl: float = 120.0, breaker: CircuitBreaker | None = None,
                 heads: HeadSlices | None = None, publishes_heads: bool = True) -> None:
        """``heads``: the model's KV heads cut into slices (tensor parallelism, kvrelay.connector.heads): this
        rank publishes the slices it holds, one chunk each; None: one chunk of all the heads this rank holds.
        ``publishes_heads`` False: another rank publishes the same (replicated) heads, so this one publishes none
        of them, and its requests settle at once."""
        if chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
        self.heads = heads
        self.publishes_heads = publishes_heads
        self._heads: tuple[int, int, int, list[tuple[int, int]]] = (0, 0, 1, [])  # set by bind
        self.client = client
        self.store_address, self.transport = store_address, transport
        self.chunk_tokens = chunk_tokens
        self.layerwise = layerwise
        self.reserve_ttl = reserve_ttl
        self.breaker = breaker  # the store's: while open, requests answer without publishing at once
        self._cache: EngineCache | None = None
        self._batch: list[PublishState] = []
        self._sent: set[int] = set()  # layers of the current batch handed to the thread
        self._jobs: queue.SimpleQueue[PublisherJob] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._open: dict[str, list[PublishState]] = {}  # request id -> its states still PUBLISHING (abort)
        self._thread = threading.Thread(target=self._run, name="kv-publisher", daemon=True)
        self._thread.start()
        self.busy_s = 0.0  # time the publisher thread spent packing + committing (bench)

    def bind(self, cache: EngineCache) -> None:
        """Called once by the engine, before its first `begin`."""
        layout = cache.layout
        if self.heads is None:  # (the params' head range, their slice count, the ranges this rank publishes)
            self._heads = (layout.head_start, layout.head_end, 1, [(layout.head_start, layout.head_end)])
        else:
            if self.heads.total != layout.total_kv_heads:
                raise ValueError(f"head slices of {self.heads.total} KV heads for a cache of {layout.total_kv_heads}")
            mine = self.heads.inside(layout.head_start, layout.head_end) if self.publishes_heads else []
            self._heads = (0, self.heads.total, self.heads.slices, mine)
        self._cache = cache
        if self.breaker is not None:
            cache.metrics.watch(self.breaker)

    @property
    def cache(self) -> EngineCache:
        if self._cache is None:
            raise RuntimeError("LayerPublisher.bind(EngineCache) was not called")
        return self._cache

    # ---- engine thread -------------------------------------------------------------------------------
    def begin(self, requests: Sequence[PublishRequest]) -> list[PublishState]:
        """Before a forward pass: reserve each request's chunks.  Returns one state per request; a refused
        reservation (store full or gone) gives a REFUSED state, and that request answers without
        publishing."""
        cache = self.cache
        layout = cache.layout
        states: list[PublishState] = []
        head_start, head_end, slices, mine = self._heads
        for req in requests:
            params = transfer_params(req.prompt, req.request_id, cache.model_id, cache.compat_hash,
                                     self.chunk_tokens, layout.num_layers, head_start, head_end,
                                     self.store_address, self.transport, prefill_epoch=cache.epoch,
                                     cache_salt=req.cache_salt, head_slices=slices)
            jobs = [c for c in chunk_jobs(params, mine) if c.token_end > req.stored_tokens]
            state = PublishState(req.request_id, req.block_ids, params, jobs,
                                 first_token_key(req.request_id, params.block_hashes))
            states.append(state)
            sizes = [(c.key, layout.chunk_nbytes(c.token_end - c.token_start, c.key.head_end - c.key.head_start))
                     for c in state.chunks]
            if req.first_token:
                sizes.append((state.meta_key, FIRST_TOKEN_BYTES))
            if not sizes:  # all of it is stored already: nothing to reserve or send (it still settles in end())
                continue
            if self.breaker is not None and not self.breaker.allow():
                state.fail(TransferFailure(FailureCode.UNAVAILABLE, f"the store is skipped after a failure "
                                                                    f"({self.breaker.last_error})"))
                state.phase = PublishPhase.REFUSED
                self.cache.metrics.publish_errors.labels(FailureCode.UNAVAILABLE.value).inc()
                continue
            try:
                # the store books the chunks to the tenant (quota, metrics, purge); the tokens describe them in
                # the store's KV events
                self.client.reserve(req.request_id, sizes, ttl=self.reserve_ttl, tenant=req.cache_salt,
                                    tokens=req.prompt)
            except Exception as exc:  # noqa: BLE001 - the store is full or gone: answer without publishing
                failure = TransferFailure.from_exception(exc, "the prefill could not reserve its chunks")
                if self.breaker is not None and failure.code in (FailureCode.UNAVAILABLE, FailureCode.TIMEOUT):
                    self.breaker.failure(str(failure))
                    state.fail(failure)
                    self.cache.metrics.publish_errors.labels(failure.code.value).inc()
                else:
                    self._failed(state, failure)
                state.phase = PublishPhase.REFUSED
                continue
            if self.breaker is not None:
                self.breaker.success()
        self._batch = [s for s in states if s.phase is PublishPhase.PUBLISHING]
        with self._lock:
            for s in self._batch:
                self._open.setdefault(s.request_id, []).append(s)
        self._sent = set()
        return states

    def layer_done(self, layer: int) -> None:
        """Inside the forward pass, once ``layer``'s KV is in the cache.  Returns at once."""
        if self.layerwise and self._batch and layer not in self._sent:
            self._sent.add(layer)
            self._jobs.put(PublishLayer(layer, list(self._batch)))

    def end(self, states: Sequence[PublishState], first_tokens: Sequence[int | None],
            done: Callable[[PublishState], None]) -> None:
        """After sampling: ``first_tokens`` aligned with ``states`` (as `begin` returned them; None where the
        request publishes no first token).  ``done(state)`` is called from the publisher thread for every
        PUBLISHING state once it settled."""
        batch, self._batch = self._batch, []
        for layer in range(self.cache.layout.num_layers):  # all of them without layerwise; else any not seen
            if batch and layer not in self._sent:
                self._jobs.put(PublishLayer(layer, batch))
        self._sent = set()
        firsts = {id(s): t for s, t in zip(states, first_tokens, strict=True)}
        for state in batch:
            state.params.first_token = firsts[id(state)]
        self._jobs.put(FinishBatch(time.monotonic(), batch, [firsts[id(s)] for s in batch], done))

    def abort(self, request_id: str, reason: str) -> bool:
        """Any thread: ``request_id`` was aborted.  If it is being published, no further layer of it is and
        its reservation goes back to the store (on the publisher thread, ahead of the layers still queued);
        it still settles (FAILED, code ABORTED) through ``done``.  Returns whether it was being published."""
        with self._lock:
            states = [s for s in self._open.get(request_id, ()) if s.phase is PublishPhase.PUBLISHING]
            for state in states:
                if state.abort_reason is None:
                    state.abort_reason = reason or "aborted"
        for state in states:
            self._jobs.put(AbortPublish(state))
        return bool(states)

    def drain(self, timeout: float) -> bool:
        """Wait until every job handed over so far is done (an engine about to reuse blocks of a preempted
        request).  False if ``timeout`` passed first."""
        done = threading.Event()
        self._jobs.put(Drain(done))
        return done.wait(timeout)

    def close(self) -> None:
        if self.breaker is not None:
            self.breaker.close()
        self._jobs.put(StopPublisher())
        self._thread.join(10)
        self.client.close()

    # ---- publisher thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        quiet_torch_thread()
        while True:
            job = self._jobs.get()
            if isinstance(job, StopPublisher):
                return
            try:
                self._do(job)
            except Exception:  # noqa: BLE001 - a bug must not kill the thread: every later publish would hang
                log.exception("the publisher thread failed on %s; it goes on with the next job", type(job).__name__)

    def _do(self, job: PublisherJob) -> None:
        """One job of the publisher thread (a failure of a request's own publish is handled per request)."""
        match job:
            case PublishLayer(layer, batch):
                t0 = time.perf_counter()
                for state in batch:
                    if state.phase is not PublishPhase.PUBLISHING:
                        continue
                    if state.abort_reason is not None:
                        self._abandon(state)
                    else:
                        self._publish_layer(state, layer)
                self.busy_s += time.perf_counter() - t0
            case AbortPublish(state):
                if state.phase is PublishPhase.PUBLISHING:
                    self._abandon(state)
            case Drain(event):
                event.set()
            case FinishBatch(forward_end, batch, first_tokens, done):
                for state, token in zip(batch, first_tokens, strict=True):
                    try:
                        self._finish(state, token, forward_end)
                    except Exception as exc:  # noqa: BLE001 - settle it (its blocks are freed), then go on
                        log.exception("settling the publish of %s failed", state.request_id)
                        state.fail(TransferFailure(FailureCode.INTERNAL, f"the publisher failed: {exc!r}"))
                    done(state)

    def _publish_layer(self, state: PublishState, layer: int) -> None:
        cache = self.cache
        layout, metrics = cache.layout, cache.metrics
        try:
            for job in state.chunks:
                if job.layer != layer:
                    continue
                buf = self.client.publish_buffer(job.key)
                key = job.key
                n = cache.pack(layer, state.block_ids, job.token_start, job.token_end, buf, key.head_start,
                               key.head_end)
                header = ChunkHeader(compat_hash=cache.compat_hash, layer=layer, token_start=job.token_start,
                                     token_end=job.token_end, head_start=key.head_start,
                                     head_end=key.head_end, dtype=dtype_name(layout.dtype), nbytes=n,
                                     checksum=checksum(buf[:n]))
                self.client.commit(job.key, header, wait=False)  # pipelined: one round trip per layer, below
                state.committed_bytes += n
                metrics.publish_chunks.inc()
                metrics.publish_bytes.inc(n)
            self.client.flush()  # the layer's commits are answered; the first failure raises here
        except Exception as exc:  # noqa: BLE001 - the decode side is told (abort) and recomputes
            self._failed(state, TransferFailure.from_exception(exc, f"the prefill could not publish layer {layer}"))

    def _finish(self, state: PublishState, token: int | None, forward_end: float) -> None:
        with self._lock:
            mine = self._open.get(state.request_id)
            if mine is not None and state in mine:
                mine.remove(state)
                if not mine:
                    del self._open[state.request_id]
        if state.phase is PublishPhase.PUBLISHING and state.abort_reason is not None:
            self._abandon(state)
        if state.phase is PublishPhase.PUBLISHING and token is not None:
            try:
                buf = self.client.publish_buffer(state.meta_key)
                payload = first_token_payload(token)
                buf[:FIRST_TOKEN_BYTES].copy_(payload)
                self.client.commit(state.meta_key,
                                   first_token_header(state.params.compat_hash, state.params.num_tokens, payload))
            except Exception as exc:  # noqa: BLE001 - decode legs that know the first token do not need it
                self._failed(state, TransferFailure.from_exception(
                    exc, "the prefill could not publish its first token"))
        self.cache.metrics.publish_lag.observe(time.monotonic() - forward_end)
        if state.phase is PublishPhase.PUBLISHING:
            state.phase = PublishPhase.COMMITTED
            return
        try:
            self.client.release(state.request_id)
        except Exception:  # noqa: BLE001 - best effort; reservations expire anyway
            pass

    def _abandon(self, state: PublishState) -> None:
        """Publisher thread: ``state``'s request was aborted while PUBLISHING.  It fails (ABORTED) and reads no
        more blocks; the store ends the waits of its pulls and drops its reserved (uncommitted) chunks now."""
        reason = state.abort_reason or "aborted"
        log.info("publishing %s stops: %s", state.request_id, reason)
        state.fail(TransferFailure(FailureCode.ABORTED, f"the request was aborted while it was published: {reason}"))
        if self.breaker is not None and not self.breaker.allow():
            return  # the store is skipped: its reservations expire there (reserve_ttl)
        try:
            self.client.abort(state.request_id, reason)
            self.client.release(state.request_id)
        except Exception as exc:  # noqa: BLE001 - the store is gone: its reservations expire there (reserve_ttl)
            log.warning("could not release the reservation of aborted request %s: %s", state.request_id, exc)

    def _failed(self, state: PublishState, failure: TransferFailure) -> None:
        """Record the failure, count it, and tell the store: a decode leg may already wait for this
        request's chunks, and its pulls then fail now (it recomputes) instead of at its deadline."""
        log.warning("publishing %s failed: %s", state.request_id, failure)
        self.cache.metrics.publish_errors.labels(failure.code.value).inc()
        state.fail(failure)
        if failure.code is FailureCode.UNAVAILABLE:  # the store is gone: nobody to tell, and the calls after
            if self.breaker is not None:            # this one skip it until its probe answers
                self.breaker.failure(str(failure))
            return
        try:
            self.client.abort(state.request_id, str(failure))
        except Exception as exc:  # noqa: BLE001 - the store is gone: the decode's deadline still bounds the wait
            log.warning("could not tell the store that %s is aborted: %s", state.request_id, exc)
