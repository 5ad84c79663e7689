"""Decode side: fill a request's blocks with its prompt KV pulled from the store.

Owns: `LayerPuller`.  For a `PullState` (the request's `KVTransferParams`, its block ids, and how many
leading tokens the engine's own prefix cache already holds) a worker thread pulls layer by layer, up to
PULL_BATCH chunks of a layer per round trip (the store parks a pull until the prefill committed the
chunks, within the deadline), checks each header against what it asked for (checksums are verified by
the client), and unpacks into this engine's block size (`kvrelay.kernels.unpack`).  Progress is
published on the state layer by layer (`PullState.wait_layer`), and the state settles DONE or FAILED
with a `TransferFailure` before ``done(state)`` is called; the engine applies its failure policy.

From which store: the one the request's params name (``store_address``, its prefill's store).  That is
this engine's own store (its ``client``), or with a store on every host another host's, through a client
of `StoreClients` (stores.py: a small bounded cache of clients per store, each with its own breaker); a
store that is neither is refused (MISMATCH).  A prefix load (the state's ``tokens``: a router hinted that a store
holds them) looks its last layer up first and fails at once where it is gone.  With ``keep_copies``, such a pull
named to another host's store is served by the own store when that holds every chunk already (one lookup),
and otherwise the chunks pulled from the far store are also kept in the own store (localcopy.py).

A request that ends (issue 26) releases what its pulls hold in the store at once, not when a lease runs
out: once a state settled (done, failed or cancelled) the pins of its last pulls go back to the store
with one ping (they would otherwise wait for this client's next request, or ``pull_pin_ttl``); and
`cancel` (the engine aborted the request) stops a pull that waits in the store for chunks the prefill
has not committed, by aborting the request id there (the id names one client request: its decode leg
is the only puller, and a retried leg on another worker recomputes what was not yet committed).

Engine-independent: it works from an `EngineCache`, block ids and a callback.  Must not touch: the
engine's scheduling; blocks other than the request's.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import torch

from kvrelay.connector.addressing import FIRST_TOKEN_BYTES, chunk_ranges, first_token_key, head_ranges
from kvrelay.connector.binding import EngineCache
from kvrelay.connector.breaker import CircuitBreaker
from kvrelay.connector.localcopy import LocalCopy, held
from kvrelay.connector.threads import quiet_torch_thread
from kvrelay.connector.state import FailureCode, PullPhase, PullState, TransferError, TransferFailure
from kvrelay.connector.stores import PullClient, StoreClients
from kvrelay.keys import ChunkKey
from kvrelay.kernels.layout import dtype_name

log = logging.getLogger("kvrelay.connector.pull")
PULL_BATCH = 8  # chunks of one layer pulled per store round trip (StoreClient.pull_many)


class LayerPuller:
    def __init__(self, client: PullClient, store_address: str, workers: int = 2,
                 breaker: CircuitBreaker | None = None, *, peers: Sequence[str] = (),
                 make: Callable[[str], PullClient] | None = None, keep_copies: bool = False) -> None:
        """``client``: this engine's store's (at ``store_address``); ``peers``: the other hosts' stores a request
        may name (a store per host), reached through ``make(address)`` (stores.py); ``keep_copies``: keep what
        is pulled from them in the own store, and read it from there next time (localcopy.py)."""
        self.client = client
        self.keep_copies = keep_copies
        self.breaker = breaker  # the own store's: while open, its pulls fail at once (the engine recomputes)
        self.store_address = store_address
        self.stores = StoreClients(client, store_address, peers=peers, make=make)
        self._cache: EngineCache | None = None
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kv-puller",
                                        initializer=quiet_torch_thread)
        self._tls = threading.local()

    @property
    def transport(self) -> str:
        return self.client.transport

    def check_store(self, address: str) -> None:
        """ValueError naming ``address`` unless this puller may pull from it (its own store, or a peer)."""
        try:
            self.stores.check(address)
        except TransferError as exc:
            raise ValueError(str(exc)) from None

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

    def cancel(self, state: PullState, reason: str = "the decode request was aborted") -> None:
        """The engine aborted ``state``'s request: stop its pull.  The worker stops before its next round
        trip, and a pull waiting in the store for chunks not yet committed fails at once (the store aborts
        the request id).  ``done`` is still called once, when the state settled; the engine reuses the
        blocks only then."""
        state.cancel()
        address = state.params.store_address
        breaker = self.breaker if address == self.store_address else self.stores.breaker(address)
        client = self.stores.lookup(address)
        if state.settled or client is None or (breaker is not None and not breaker.allow()):
            return
        try:
            client.abort(state.request_id, reason)
        except Exception as exc:  # noqa: BLE001 - the store is gone: the pull's deadline still bounds the wait
            log.warning("could not end the store wait of aborted request %s: %s", state.request_id, exc)

    def close(self) -> None:
        if self.breaker is not None:
            self.breaker.close()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.stores.close()  # this engine's own client too

    def _buffer(self, nbytes: int) -> torch.Tensor:
        buf = getattr(self._tls, "buf", None)
        if buf is None or buf.numel() < nbytes:
            buf = self._tls.buf = torch.empty(nbytes, dtype=torch.uint8)
        return buf

    def _pull_guarded(self, state: PullState, deadline: float, done: Callable[[PullState], None]) -> None:
        state.phase = PullPhase.PULLING
        failure = None
        address = state.source = self._source(state)
        breaker = self.breaker if address == self.store_address else None  # another store's: stores.py
        client: PullClient | None = None
        if breaker is not None and not breaker.allow():
            failure = TransferFailure(FailureCode.UNAVAILABLE, f"the store is skipped after a failure "
                                                               f"({breaker.last_error})")
        else:
            try:
                self._check(state)
                with self.stores.using(address) as client:
                    self._pull(state, deadline, client)
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
        if client is not None and (failure is None or failure.code is not FailureCode.UNAVAILABLE):
            self._hand_back_pins(state, client)

    def _heads(self, state: PullState) -> list[tuple[int, int]]:
        """The head ranges of ``state``'s chunks this rank pulls: those that intersect the heads it keeps
        (tensor parallelism: a rank pulls its share of a prefill's slices, kvrelay.connector.heads)."""
        layout = self.cache.layout
        return [(a, b) for a, b in head_ranges(state.params) if a < layout.head_end and b > layout.head_start]

    def _keys(self, state: PullState) -> list[ChunkKey]:
        kp = state.params
        return [ChunkKey(h, layer, a, b) for layer in range(kp.num_layers) for h in kp.block_hashes
                for a, b in self._heads(state)]

    def _source(self, state: PullState) -> str:
        """The store to pull ``state`` from: the one its params name, or with ``keep_copies`` the own store when
        it holds every chunk (a copy kept by an earlier pull of the same prefix)."""
        address = state.params.store_address
        if not self.keep_copies or not state.tokens or address == self.store_address or \
                (self.breaker is not None and not self.breaker.allow()):
            return address
        return self.store_address if held(self.client, self._keys(state), state.tenant) else address  # type: ignore[arg-type]

    def _copy(self, state: PullState, client: PullClient, todo: list[tuple[str, int, int, int, int]]
              ) -> LocalCopy | None:
        """With ``keep_copies``, a copy into the own store of the chunks ``todo`` pulled from another host's."""
        if not self.keep_copies or not state.tokens or client is self.client or not todo:
            return None
        kp, layout = state.params, self.cache.layout
        sizes = [(ChunkKey(h, layer, a, b), layout.chunk_nbytes(t1 - t0, b - a))
                 for layer in range(kp.num_layers) for h, t0, t1, a, b in todo]
        return LocalCopy(self.client, kp.request_id, sizes, state.tokens[:kp.num_tokens],  # type: ignore[arg-type]
                         tenant=state.tenant)

    def _hand_back_pins(self, state: PullState, client: PullClient) -> None:
        """The request's pulls are over: the pins of its last round trips go back to the store now (a ping
        carries them) rather than with this client's next request, which may come much later."""
        try:
            client.ping()
        except Exception as exc:  # noqa: BLE001 - they go with the next request, or expire (pull_pin_ttl)
            log.debug("could not hand back the pins of %s: %s", state.request_id, exc)

    def _check(self, state: PullState) -> None:
        kp, layout = state.params, self.cache.layout
        self.stores.check(kp.store_address)  # this engine's store or another host's it knows, else MISMATCH
        if kp.num_layers != layout.num_layers:
            raise TransferError(FailureCode.MISMATCH, f"kv_transfer_params has {kp.num_layers} layers, this "
                                                      f"model {layout.num_layers}")
        heads = self._heads(state)
        if sum(min(b, layout.head_end) - max(a, layout.head_start) for a, b in heads) != layout.num_kv_heads:
            raise TransferError(FailureCode.MISMATCH,
                                f"the prefill published KV heads [{kp.head_start}, {kp.head_end}) in "
                                f"{kp.head_slices} slice(s) of {layout.total_kv_heads}; this rank keeps heads "
                                f"[{layout.head_start}, {layout.head_end}), which they do not cover")

    def _pull(self, state: PullState, deadline: float, client: PullClient) -> None:
        cache = self.cache
        kp, layout = state.params, cache.layout
        heads = self._heads(state)
        if state.tokens:  # a prefix load: its chunks are there already (never waited for), or it ends now
            last = [ChunkKey(h, kp.num_layers - 1, a, b) for h in kp.block_hashes for a, b in heads]
            lookup = getattr(client, "lookup", None)  # the last layer is committed last: all of it is there
            if lookup is not None and (lookup(last, tenant=state.tenant) if state.tenant else lookup(last)) < len(last):
                raise TransferError(FailureCode.REFUSED, f"store {state.source or kp.store_address} no longer holds "
                                                         f"the {kp.num_tokens}-token prefix")
        skip = state.skip_tokens
        todo = [(h, t0, t1, a, b) for h, (t0, t1) in zip(kp.block_hashes, chunk_ranges(kp.num_tokens, kp.chunk_tokens),
                                                         strict=True) if t1 > skip for a, b in heads]
        cbytes = layout.chunk_nbytes(kp.chunk_tokens, max(b - a for a, b in heads))
        batch = max(1, min(PULL_BATCH, len(todo)))
        buf = self._buffer(max(batch * cbytes, FIRST_TOKEN_BYTES))
        outs = [buf[i * cbytes:(i + 1) * cbytes] for i in range(batch)]
        copy = self._copy(state, client, todo)
        try:
            for layer in range(layout.num_layers):
                self._pull_layer(state, layer, deadline, client, todo, outs, copy)
                state.advance(layer + 1)
        finally:
            if copy is not None:
                copy.close(complete=state.layers_done == layout.num_layers)
        state.first_token = kp.first_token
        if state.first_token is None and state.fetch_first_token:  # decode leg sent before the prefill answered
            hdr = client.pull(first_token_key(kp.request_id, kp.block_hashes), buf, deadline,
                                   request_id=kp.request_id)
            if hdr.nbytes != FIRST_TOKEN_BYTES or hdr.dtype != "int64":
                raise TransferError(FailureCode.MISMATCH, f"first-token chunk of {kp.request_id} has "
                                                          f"{hdr.nbytes} bytes of {hdr.dtype}")
            state.first_token = int(buf[:FIRST_TOKEN_BYTES].view(torch.int64).item())
        cache.metrics.pull_bytes.inc(state.pulled_bytes)

    def _pull_layer(self, state: PullState, layer: int, deadline: float, client: PullClient,
                    todo: list[tuple[str, int, int, int, int]], outs: list[torch.Tensor], copy: LocalCopy | None
                    ) -> None:
        """Pull and unpack one layer's chunks ``todo``, ``len(outs)`` per store round trip."""
        cache = self.cache
        kp, layout = state.params, cache.layout
        skip, batch = state.skip_tokens, len(outs)
        want_dtype = dtype_name(layout.dtype)
        for g in range(0, len(todo), batch):
            group = todo[g:g + batch]
            if state.cancelled:
                raise TransferError(FailureCode.ABORTED, "aborted")
            keys = [ChunkKey(h, layer, a, b) for h, _, _, a, b in group]
            # one store round trip for the group (each chunk's checksum is still verified by the client)
            hdrs = client.pull_many(keys, outs[:len(group)], deadline, request_id=kp.request_id)
            for (_, t0, t1, a, b), key, hdr, out in zip(group, keys, hdrs, outs, strict=False):
                if (hdr.layer, hdr.token_start, hdr.token_end, hdr.head_start, hdr.head_end) != \
                        (layer, t0, t1, a, b) or hdr.dtype != want_dtype:
                    raise TransferError(
                        FailureCode.MISMATCH,
                        f"chunk {key} has header layer {hdr.layer} tokens [{hdr.token_start}, {hdr.token_end}) "
                        f"heads [{hdr.head_start}, {hdr.head_end}) {hdr.dtype}; expected layer {layer} "
                        f"[{t0}, {t1}) [{a}, {b}) {want_dtype}")
                state.pulled_bytes += hdr.nbytes
                chunk = out[:hdr.nbytes]
                if copy is not None:
                    copy.put(key, hdr, chunk)
                start = max(t0, skip)
                if start > t0:  # this engine already holds the chunk's first tokens: unpack only the rest
                    heads = hdr.head_end - hdr.head_start
                    full = chunk.view(layout.dtype).view(layout.num_kv, t1 - t0, heads, layout.head_dim)
                    chunk = full[:, start - t0:].contiguous()
                cache.unpack(layer, state.block_ids, start, t1, chunk, hdr.head_start, hdr.head_end)
        if copy is not None:
            copy.layer_done()
