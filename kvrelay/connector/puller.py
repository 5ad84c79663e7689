"""Decode side: fill a request's blocks with its prompt KV pulled from the store.

Owns: `LayerPuller`.  For a `PullState` (the request's `KVTransferParams`, its block ids, and how many
leading tokens the engine's own prefix cache already holds) a worker thread pulls layer by layer, up to
PULL_BATCH chunks of a layer per round trip (the store parks a pull until the prefill committed the
chunks, within the deadline), checks each header against what it asked for (checksums are verified by
the client), and unpacks into this engine's block size (`kvrelay.kernels.unpack`).  Progress is
published on the state layer by layer (`PullState.wait_layer`), and the state settles DONE or FAILED
with a `TransferFailure` before ``done(state)`` is called; the engine applies its failure policy.

Engine-independent: it works from an `EngineCache`, block ids and a callback.  Must not touch: the
engine's scheduling; blocks other than the request's.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Protocol, Sequence

import torch

from kvrelay.connector.addressing import FIRST_TOKEN_BYTES, chunk_ranges, first_token_key
from kvrelay.connector.binding import EngineCache
from kvrelay.connector.breaker import CircuitBreaker
from kvrelay.connector.threads import quiet_torch_thread
from kvrelay.connector.state import FailureCode, PullPhase, PullState, TransferError, TransferFailure
from kvrelay.keys import ChunkKey
from kvrelay.kernels.layout import dtype_name
from kvrelay.transfer.wire import ChunkHeader

log = logging.getLogger("kvrelay.connector.pull")
PULL_BATCH = 8  # chunks of one layer pulled per store round trip (StoreClient.pull_many)


class PullClient(Protocol):
    """The part of `kvrelay.store.client.StoreClient` a puller uses."""

    transport: str

    def pull(self, key: ChunkKey, out: torch.Tensor, deadline: float, verify_checksum: bool = ...,
             request_id: str = ...) -> ChunkHeader: ...
    def pull_many(self, keys: Sequence[ChunkKey], outs: Sequence[torch.Tensor], deadline: float,
                  verify_checksum: bool = ..., request_id: str = ...) -> list[ChunkHeader]: ...
    def close(self) -> None: ...


class LayerPuller:
    def __init__(self, client: PullClient, store_address: str, workers: int = 2,
                 breaker: CircuitBreaker | None = None) -> None:
        self.client = client
        self.breaker = breaker  # the store's: while open, pulls fail at once (the engine recomputes)
        self.store_address = store_address
        self._cache: EngineCache | None = None
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kv-puller",
                                        initializer=quiet_torch_thread)
        self._tls = threading.local()

    @property
    def transport(self) -> str:
        return self.client.transport

    def bind(self, cache: EngineCache) -> None:
        """Called once by the engine, before its first `start`."""
        self._cache = cache
        if self.breaker is not None:
            cache.metrics.watch(self.breaker)

    @property
    def cache(self) -> EngineCache:
        if self._cache is None:
            raise RuntimeError("LayerPuller.bind(EngineCache) was not called")
        return self._cache

    def start(self, state: PullState, deadline: float, done: Callable[[PullState], None]) -> None:
        """Pull ``state`` on a worker thread; every wait ends by ``deadline`` (time.monotonic()).  ``done`` is
        called exactly once, whatever happens (a closed or broken puller settles the state at once)."""
        try:
            self._pool.submit(self._pull_guarded, state, deadline, done)
        except Exception as exc:  # noqa: BLE001 - RuntimeError after close, BrokenThreadPool
            state.settle(TransferFailure(FailureCode.INTERNAL, f"the puller cannot start a pull: {exc}"))
            done(state)

    def close(self) -> None:
        if self.breaker is not None:
            self.breaker.close()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()

    def _buffer(self, nbytes: int) -> torch.Tensor:
        buf = getattr(self._tls, "buf", None)
        if buf is None or buf.numel() < nbytes:
            buf = self._tls.buf = torch.empty(nbytes, dtype=torch.uint8)
        return buf

    def _pull_guarded(self, state: PullState, deadline: float, done: Callable[[PullState], None]) -> None:
        state.phase = PullPhase.PULLING
        failure = None
        breaker = self.breaker
        if breaker is not None and not breaker.allow():
            failure = TransferFailure(FailureCode.UNAVAILABLE, f"the store is skipped after a failure "
                                                               f"({breaker.last_error})")
        else:
            try:
                self._pull(state, deadline)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a reason for the engine's policy
                failure = TransferFailure.from_exception(exc)
                if failure.code is FailureCode.INTERNAL:
                    log.exception("pull of %s failed", state.request_id)
            if breaker is not None:
                if failure is None:
                    breaker.success()
                elif failure.code is FailureCode.UNAVAILABLE:
                    breaker.failure(str(failure))
        state.settle(failure)
        done(state)

    def _check(self, state: PullState) -> None:
        kp, layout = state.params, self.cache.layout
        if kp.store_address != self.store_address:
            raise TransferError(FailureCode.MISMATCH, f"kv_transfer_params name store {kp.store_address}, this "
                                                      f"worker uses {self.store_address}")
        if kp.num_layers != layout.num_layers:
            raise TransferError(FailureCode.MISMATCH, f"kv_transfer_params has {kp.num_layers} layers, this "
                                                      f"model {layout.num_layers}")

    def _pull(self, state: PullState, deadline: float) -> None:
        self._check(state)
        cache = self.cache
        kp, layout = state.params, cache.layout
        skip = state.skip_tokens
        todo = [(h, t0, t1) for h, (t0, t1) in zip(kp.block_hashes, chunk_ranges(kp.num_tokens, kp.chunk_tokens),
                                                   strict=True) if t1 > skip]
        want_dtype = dtype_name(layout.dtype)
        cbytes = layout.chunk_nbytes(kp.chunk_tokens, kp.head_end - kp.head_start)
        batch = max(1, min(PULL_BATCH, len(todo)))
        buf = self._buffer(max(batch * cbytes, FIRST_TOKEN_BYTES))
        outs = [buf[i * cbytes:(i + 1) * cbytes] for i in range(batch)]
        for layer in range(layout.num_layers):
            for g in range(0, len(todo), batch):
                group = todo[g:g + batch]
                if state.cancelled:
                    raise TransferError(FailureCode.ABORTED, "aborted")
                keys = [ChunkKey(h, layer, kp.head_start, kp.head_end) for h, _, _ in group]
                # one store round trip for the group (each chunk's checksum is still verified by the client)
                hdrs = self.client.pull_many(keys, outs[:len(group)], deadline, request_id=kp.request_id)
                for (_, t0, t1), key, hdr, out in zip(group, keys, hdrs, outs, strict=False):
                    if (hdr.layer, hdr.token_start, hdr.token_end, hdr.head_start, hdr.head_end) != \
                            (layer, t0, t1, kp.head_start, kp.head_end) or hdr.dtype != want_dtype:
                        raise TransferError(
                            FailureCode.MISMATCH,
                            f"chunk {key} has header layer {hdr.layer} tokens [{hdr.token_start}, {hdr.token_end}) "
                            f"heads [{hdr.head_start}, {hdr.head_end}) {hdr.dtype}; expected layer {layer} "
                            f"[{t0}, {t1}) [{kp.head_start}, {kp.head_end}) {want_dtype}")
                    state.pulled_bytes += hdr.nbytes
                    chunk = out[:hdr.nbytes]
                    start = max(t0, skip)
                    if start > t0:  # this engine already holds the chunk's first tokens: unpack only the rest
                        heads = hdr.head_end - hdr.head_start
                        full = chunk.view(layout.dtype).view(layout.num_kv, t1 - t0, heads, layout.head_dim)
                        chunk = full[:, start - t0:].contiguous()
                    cache.unpack(layer, state.block_ids, start, t1, chunk, hdr.head_start, hdr.head_end)
            state.advance(layer + 1)
        state.first_token = kp.first_token
        if state.first_token is None and state.fetch_first_token:  # decode leg sent before the prefill answered
            hdr = self.client.pull(first_token_key(kp.request_id, kp.block_hashes), buf, deadline,
                                   request_id=kp.request_id)
            if hdr.nbytes != FIRST_TOKEN_BYTES or hdr.dtype != "int64":
                raise TransferError(FailureCode.MISMATCH, f"first-token chunk of {kp.request_id} has "
                                                          f"{hdr.nbytes} bytes of {hdr.dtype}")
            state.first_token = int(buf[:FIRST_TOKEN_BYTES].view(torch.int64).item())
        cache.metrics.pull_bytes.inc(state.pulled_bytes)
