"""The scheduler-side half of the vLLM connector (vLLM's EngineCore process): decides, per request, what
to load from the kvrelay store and what to publish, and tells the worker each step (`StepMeta`).

- **Loads.**  A decode leg (``kv_transfer_params.do_remote_prefill``) loads its whole prompt: the prefill
  publishes it layer by layer at the same time and the pulls wait in the store for each layer.  Any other
  request (roles kv_consumer / kv_both, ``prefix_lookup``) looks its prompt up in the store: the keys of
  the *last* layer, committed last, so a hit means every layer is there.  Loads are asynchronous (vLLM
  keeps the request waiting until the worker reports it), never offered twice for a request whose load
  failed, and skipped at once while the store's circuit breaker is open.
- **Hints.**  A request the router sends to a decode alone with a hint (``kvrelay_prefix_store`` and
  ``kvrelay_prefix_tokens``: a store on every host, that store holds the prompt's prefix) loads the whole chunks
  of that prefix from the store named, when it is this engine's own or one of its ``peer_stores`` (prefix
  reuse across hosts, issue 23); vLLM computes the rest.  It trusts the router's view (no lookup in the far
  store): a prefix gone meanwhile fails its load after the short deadline of prefix loads, and vLLM recomputes.
- **Saves.**  Roles kv_producer / kv_both publish a request's prompt in the step where its last prompt
  token is computed (unless it all came from the store).  Such a request's blocks are freed only once
  the worker reports its publish settled (``delay_free``).
- **Params.**  A prefill leg (``do_remote_decode``) answers with `KVTransferParams` plus
  ``do_remote_prefill: true``, which a decode leg sent by vLLM's proxy conventions carries back.

Owns: that bookkeeping.  Must not touch: the cache, the worker, vLLM's scheduler state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import msgspec

from kvrelay import security
from kvrelay.connector import CircuitBreaker, FailureCode, TransferFailure, transfer_params
from kvrelay.connector.heads import HeadSlices
from kvrelay.engines.vllm.config import RelayConfig
from kvrelay.engines.vllm.meta import LoadSpec, SaveSpec, StepMeta
from kvrelay.keys import ChunkKey, block_hashes
from kvrelay.params import DO_REMOTE_DECODE, DO_REMOTE_PREFILL, PREFIX_STORE, PREFIX_TOKENS, RELAY_ID, STORE_ADDRESS
from kvrelay.security import params as signed_params

log = logging.getLogger("kvrelay.vllm.scheduler")


def _ping(client: "LookupClient") -> int:
    client.ping()
    return 0


class LookupClient(Protocol):
    def lookup(self, keys: list[ChunkKey], tenant: str = ...) -> int: ...
    def ping(self) -> None: ...
    def close(self) -> None: ...


@dataclass
class _Request:
    req_id: str
    token_ids: list[int]
    params: dict[str, Any]
    relay_id: str
    hashes: list[str] | None = None
    matched: tuple[int, int] | None = None  # (num_computed asked, tokens offered)
    load: LoadSpec | None = None
    loaded_tokens: int = 0
    saving: bool = False  # a save was scheduled: its blocks are freed when the worker says so
    cache_salt: str = ""  # vLLM's request.cache_salt: the tenant, part of every chunk's address (kvrelay.keys)


@dataclass
class SchedulerStats:
    """Counts since the last `take_counts` (vLLM's connector stats; failed loads are the worker's)."""

    lookup_hit_tokens: int = 0
    lookup_miss_tokens: int = 0
    skipped_store_down: int = 0
    params_refused: int = 0


class SchedulerSide:
    def __init__(self, cfg: RelayConfig, compat_hash: str, num_layers: int, total_kv_heads: int,
                 block_size: int, client_factory: Callable[[], LookupClient], head_slices: int = 1) -> None:
        """``head_slices``: this engine publishes (and looks up) the KV heads in that many chunks (tensor
        parallelism, kvrelay.connector.heads)."""
        self.cfg, self.compat_hash = cfg, compat_hash
        self.heads = HeadSlices(total_kv_heads, head_slices)
        self.num_layers, self.total_kv_heads, self.block_size = num_layers, total_kv_heads, block_size
        self._client_factory = client_factory
        self._client: LookupClient | None = None
        self.breaker = CircuitBreaker("kvrelay store (scheduler)", cfg.breaker_cooldown_s, probe=self._probe)
        self._reqs: dict[str, _Request] = {}
        self._pending_loads: list[LoadSpec] = []
        self._aborted_saves: list[str] = []  # relay ids for the next step's StepMeta.aborted
        self._failed_loads: set[str] = set()
        self.stats = SchedulerStats()

    # ---- vLLM hooks --------------------------------------------------------------------------------------
    def track(self, req_id: str, token_ids: Sequence[int], params: dict[str, Any] | None,
              cache_salt: str = "") -> _Request:
        r = self._reqs.get(req_id)
        if r is None:
            p = self._checked(req_id, dict(params or {}))
            r = self._reqs[req_id] = _Request(req_id, list(token_ids), p, str(p.get(RELAY_ID) or req_id),
                                              cache_salt=cache_salt)
        return r

    def _checked(self, req_id: str, params: dict[str, Any]) -> dict[str, Any]:
        """With keys on, kvrelay's ``kv_transfer_params`` count only when the router signed them for their relay
        id (kvrelay/security/params.py, as the reference engine checks them): unsigned or badly signed ones are
        ignored, so vLLM computes the request alone (a client can neither make a decode pull nor a prefill
        publish under an id of its choosing).  vLLM gives a connector no way to refuse a request with 403."""
        keys = security.current()
        if keys is None or not params.keys() & {DO_REMOTE_DECODE, DO_REMOTE_PREFILL, RELAY_ID}:
            return params
        try:
            return signed_params.verify(keys, params, str(params.get(RELAY_ID) or ""))
        except signed_params.ParamsRefused as exc:
            log.warning("request %s: its kv_transfer_params are ignored, vLLM computes it alone: %s", req_id, exc)
            self.stats.params_refused += 1
            return {}

    def matched_tokens(self, req_id: str, token_ids: Sequence[int], params: dict[str, Any] | None,
                       num_computed: int, cache_salt: str = "") -> tuple[int, bool]:
        """How many prompt tokens after ``num_computed`` the store will provide (loaded asynchronously)."""
        r = self.track(req_id, token_ids, params, cache_salt)
        if not self.cfg.loads or req_id in self._failed_loads or r.load is not None:
            return 0, False
        if r.matched is not None and r.matched[0] == num_computed:
            return r.matched[1], r.matched[1] > 0
        n = len(r.token_ids)
        offer = 0
        if r.params.get(DO_REMOTE_PREFILL):
            if self._store_alive():  # decode leg: the prefill publishes the whole prompt right now
                offer = max(0, n - num_computed)
            else:
                log.warning("decode leg %s: the store is not reachable; vLLM computes its %d prompt tokens itself",
                            req_id, n - num_computed)
        elif (hinted := self._hinted(r)) > num_computed:  # the router: a store holds this prefix
            offer = hinted - num_computed
        elif self.cfg.prefix_lookup and n > num_computed:
            offer = max(0, self._stored_tokens(r) - num_computed)
        r.matched = (num_computed, offer)
        return offer, offer > 0

    def after_alloc(self, req_id: str, block_ids: Sequence[int], num_external: int) -> None:
        r = self._reqs.get(req_id)
        if r is None or num_external <= 0 or r.load is not None or r.matched is None:
            return
        skip = r.matched[0]
        # a decode leg waits for its prefill; a prefix found by lookup is already there (a short deadline)
        wait = self.cfg.pull_timeout_s if r.params.get(DO_REMOTE_PREFILL) else min(self.cfg.pull_timeout_s, 5.0)
        # a decode leg names its prefill's store (the router's light params, or the prefill's own answer)
        store = r.params.get(STORE_ADDRESS) if r.params.get(DO_REMOTE_PREFILL) else \
            r.params.get(PREFIX_STORE) if self._hinted(r) else None  # or the store a router's hint names
        r.load = LoadSpec(req_id, r.relay_id, self._hashes(r), skip + num_external, list(block_ids), skip, wait,
                          store if isinstance(store, str) else "", self._slices_of(r))
        r.loaded_tokens = skip + num_external
        self._pending_loads.append(r.load)

    def build_meta(self, scheduled: Sequence[tuple[str, int, int]],
                   blocks_of: Callable[[str], list[int]]) -> StepMeta:
        """``scheduled``: (req_id, tokens computed before this step, tokens scheduled in it)."""
        meta = StepMeta(loads=self._pending_loads, aborted=self._aborted_saves)
        self._pending_loads, self._aborted_saves = [], []
        if not self.cfg.publishes:
            return meta
        for req_id, computed, num_new in scheduled:
            r = self._reqs.get(req_id)
            if r is None:
                continue
            n = len(r.token_ids)
            if computed < n <= computed + num_new and r.loaded_tokens < n:
                nblocks = -(-n // self.block_size)
                # a prefix found by lookup holds chunks [0, loaded_tokens) in the store: only the rest is sent
                stored = r.loaded_tokens if r.load is not None and not r.params.get(DO_REMOTE_PREFILL) else 0
                meta.saves.append(SaveSpec(req_id, r.relay_id, r.token_ids, blocks_of(req_id)[:nblocks], stored,
                                           r.cache_salt))
                r.saving = True
        return meta

    def load_failed(self, finished_recving: set[str], invalid_block_ids: set[int]) -> None:
        """From the worker's output: a finished load whose blocks were reported invalid is not offered again."""
        if not invalid_block_ids:
            return
        for req_id in finished_recving:
            r = self._reqs.get(req_id)
            if r is not None and r.load is not None and invalid_block_ids & set(r.load.block_ids):
                self._failed_loads.add(req_id)
                r.loaded_tokens = 0
                r.matched = None

    def finished(self, req_id: str, aborted: bool = False) -> tuple[bool, dict[str, Any] | None]:
        """(delay_free, kv_transfer_params) for vLLM's request_finished.  A request vLLM ``aborted`` while its
        publish may still run is named in the next step's `StepMeta.aborted`: the worker stops that publish
        and gives its store reservation back (issue 26), rather than letting it drain."""
        r = self._reqs.pop(req_id, None)
        self._failed_loads.discard(req_id)
        if r is None:
            return False, None
        if aborted and r.saving:
            self._aborted_saves.append(r.relay_id)
        params = None
        if r.params.get(DO_REMOTE_DECODE) and (r.saving or r.loaded_tokens >= len(r.token_ids)):
            # published now, or every chunk was already in the store (this prefill loaded them all)
            kp = transfer_params(r.token_ids, r.relay_id, self.cfg.model_id, self.compat_hash, self.cfg.chunk_tokens,
                                 self.num_layers, 0, self.total_kv_heads, self.cfg.store, self.cfg.transport,
                                 cache_salt=r.cache_salt, head_slices=self.heads.slices)
            params = {**msgspec.to_builtins(kp), DO_REMOTE_PREFILL: True, DO_REMOTE_DECODE: False,
                      RELAY_ID: r.relay_id}
            if (keys := security.current()) is not None:  # a decode leg sent with them checks this signature
                params = signed_params.sign(keys, params, r.relay_id)
        return r.saving, params

    def take_counts(self) -> dict[str, int]:
        """Counts since the last call, for vLLM's connector stats."""
        st = self.stats
        counts = {"lookup_hit_tokens": st.lookup_hit_tokens, "lookup_miss_tokens": st.lookup_miss_tokens,
                  "store_skipped": st.skipped_store_down, "params_refused": st.params_refused}
        self.stats = SchedulerStats()
        return {k: v for k, v in counts.items() if v}

    def close(self) -> None:
        self.breaker.close()
        if self._client is not None:
            self._client.close()
            self._client = None

    # ---- store ---------------------------------------------------------------------------------------------
    def _hashes(self, r: _Request) -> list[str]:
        if r.hashes is None:
            r.hashes = block_hashes(r.token_ids, self.cfg.chunk_tokens, self.cfg.model_id, self.compat_hash,
                                    r.cache_salt)
        return r.hashes

    def _call(self, what: str, call: Callable[[LookupClient], int]) -> int | None:
        """One store call through the breaker: None when the store is skipped or failed."""
        if not self.breaker.allow():
            self.stats.skipped_store_down += 1
            return None
        try:
            if self._client is None:
                self._client = self._client_factory()
            result = call(self._client)
        except Exception as exc:  # noqa: BLE001 - the store is down or refuses: compute locally
            failure = TransferFailure.from_exception(exc, what)
            if failure.code in (FailureCode.UNAVAILABLE, FailureCode.TIMEOUT, FailureCode.INTERNAL):
                self.breaker.failure(str(failure))
                self._drop_client()
            else:
                log.warning("%s", failure)
            return None
        self.breaker.success()
        return result

    def _probe(self) -> None:
        client = self._client_factory()
        try:
            client.ping()
        finally:
            client.close()

    def _store_alive(self) -> bool:
        """A decode leg loads only from a live store (one round trip): with the store dead, every decode
        leg after the first recomputes at once instead of waiting out its pull deadline."""
        return self._call("store check", _ping) is not None

    def _stored_tokens(self, r: _Request) -> int:
        """Prompt tokens whose every layer the store holds, from token 0 (one round trip)."""
        # chunk-major, every layer: the store counts the keys present from the first, so a chunk counts only
        # when all its layers are there (LRU eviction may have taken an early layer of a later chunk)
        # (every head slice of it: tensor-parallel ranks publish their own)
        ranges = self.heads.ranges()
        keys = [ChunkKey(h, layer, a, b) for h in self._hashes(r) for layer in range(self.num_layers) for a, b in ranges]
        present = self._call("store lookup", lambda c: c.lookup(keys, tenant=r.cache_salt) if r.cache_salt
                             else c.lookup(keys))
        if present is None:
            return 0
        tokens = min(len(r.token_ids), present // (self.num_layers * len(ranges)) * self.cfg.chunk_tokens)
        self.stats.lookup_hit_tokens += tokens
        self.stats.lookup_miss_tokens += len(r.token_ids) - tokens
        return tokens

    def _slices_of(self, r: _Request) -> int:
        """The head slices ``r``'s chunks were published in: a decode leg carrying its prefill's full params
        says so (``head_slices``); the router's light params and prefix loads: this engine's own (a cluster whose
        TP sizes differ gives every server the same ``head_slices``)."""
        n = r.params.get("head_slices") if r.params.get(DO_REMOTE_PREFILL) else None
        if isinstance(n, int) and not isinstance(n, bool) and n > 0 and self.total_kv_heads % n == 0:
            return n
        return self.heads.slices

    def _hinted(self, r: _Request) -> int:
        """The prompt tokens (whole chunks) a router's hint says a store holds, where that store is this engine's
        own ("" or its address) or one of its ``peer_stores``; 0 without a usable hint."""
        tokens, store = r.params.get(PREFIX_TOKENS), r.params.get(PREFIX_STORE, "")
        if r.params.get(DO_REMOTE_PREFILL) or not isinstance(tokens, int) or isinstance(tokens, bool) or \
                not isinstance(store, str) or (store and store != self.cfg.store and store not in self.cfg.peer_stores):
            return 0
        return max(0, min(tokens, len(r.token_ids)) // self.cfg.chunk_tokens * self.cfg.chunk_tokens)

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - it is broken anyway
                pass
