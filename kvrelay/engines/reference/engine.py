"""The engine: owns the model, the paged cache, the block manager and the scheduler, and runs steps.

Owns: the step loop (one background thread, or `step()` called inline), request admission and aborts,
token emission, and the hand-offs to the P/D hooks: a `KVPublisher` (prefill role: told before a
prefill step, after each layer's KV is written, and after sampling) and a `KVPuller` (decode role: fills
a sequence's blocks from the store, then reports back); both are `kvrelay.connector`'s, bound to this
engine's cache.  Blocks a hook still reads or writes are freed only once the hook says it is done.
Other threads talk to the engine only through `add()`/`abort()` and the hooks' callbacks: messages on an
inbox queue (inbox.py); `abort()` also tells the publisher at once (thread-safe: a prefill aborted during
its forward pass publishes no further layer and gives its store reservation back).  Must not touch: HTTP (server.py), the store or transports (kvrelay.connector).
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
import uuid

import torch

from kvrelay.connector import EngineCache, PublishRequest, PublishState, PullState, TransferFailure
from kvrelay.engines.reference.block_manager import BlockManager
from kvrelay.engines.reference.config import EngineConfig, ModelConfig
from kvrelay.engines.reference.hooks import KVPublisher, KVPuller
from kvrelay.engines.reference.inbox import AbortRequest, AddSequence, InboxMessage, Published, Pulled, Wake
from kvrelay.engines.reference.metrics import EngineMetrics
from kvrelay.engines.reference.model import LlamaModel, SeqInput, make_layout
from kvrelay.engines.reference.sampler import Sampler
from kvrelay.engines.reference.scheduler import Scheduler
from kvrelay.engines.reference.sequence import Sequence, Status

log = logging.getLogger("kvrelay.engine")


class Engine:
    def __init__(self, model_cfg: ModelConfig, cfg: EngineConfig, weights: dict[str, torch.Tensor],
                 publisher: KVPublisher | None = None, puller: KVPuller | None = None) -> None:
        if cfg.max_model_len > model_cfg.max_position:
            raise ValueError(f"max_model_len {cfg.max_model_len} exceeds the model's max_position "
                             f"{model_cfg.max_position}; lower --max-model-len")
        self.model_cfg, self.cfg = model_cfg, cfg
        self.model = LlamaModel(model_cfg, weights)
        self.layout = make_layout(model_cfg, cfg.num_blocks, cfg.block_size, cfg.dtype)
        self.cache = self.layout.allocate()
        self.blocks = BlockManager(cfg.num_blocks, cfg.block_size)
        self.scheduler = Scheduler(cfg, self.blocks)
        self.sampler = Sampler()
        self.metrics = EngineMetrics(cfg.role)
        self.publisher, self.puller = publisher, puller
        self.compat_hash = self.layout.compat_hash(model_cfg.model_id)
        self.epoch = uuid.uuid4().hex  # a restarted engine is a new peer
        binding = EngineCache(self.layout, self.cache, model_cfg.model_id, self.compat_hash, self.epoch,
                              self.metrics.transfer)
        for hook in (publisher, puller):
            if hook is not None:
                hook.bind(binding)
        self._inbox: queue.SimpleQueue[InboxMessage] = queue.SimpleQueue()
        self._held: dict[int, Sequence] = {}  # finished, blocks still read by the publisher
        self._by_id: dict[str, Sequence] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.ready = threading.Event()
        self.record_logits = False  # tests: keep each sampled row's logits in seq.logits

    # ---- public, thread-safe ------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        n = len(seq.prompt)
        if n == 0:
            raise ValueError("the prompt is empty: send at least one token")
        if n + seq.params.max_tokens > self.cfg.max_model_len:
            raise ValueError(f"prompt ({n} tokens) + max_tokens ({seq.params.max_tokens}) exceeds max_model_len "
                             f"{self.cfg.max_model_len}; shorten the prompt or lower max_tokens")
        bad = [t for t in seq.prompt if not 0 <= t < self.model_cfg.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.model_cfg.vocab_size})")
        if seq.kv_params is not None:
            self._check_params(seq)
        self._inbox.put(AddSequence(seq))

    def abort(self, request_id: str) -> None:
        self._inbox.put(AbortRequest(request_id))
        if self.publisher is not None:  # a prefill being published stops now, not after this step's forward
            self.publisher.abort(request_id, f"request {request_id} was aborted")

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
            self._thread.start()
        self.ready.set()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(Wake())
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for hook in (self.publisher, self.puller):
            if hook is not None:
                hook.close()

    def generate(self, prompts: list[list[int]], params, timeout: float = 600.0) -> list[list[int]]:
        """Run prompts to completion inline (no background thread); returns the generated token ids."""
        seqs = [Sequence(list(p), params, publish=self.cfg.role == "prefill") for p in prompts]
        return [s.output for s in self.run(seqs, timeout)]

    def run(self, seqs: list[Sequence], timeout: float = 600.0) -> list[Sequence]:
        """Add ``seqs`` and step inline until all finished (and, prefill role, all published)."""
        for s in seqs:
            self.add(s)
        deadline = time.monotonic() + timeout
        while any(s.status is not Status.FINISHED for s in seqs) or any(s.seq_id in self._held for s in seqs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"run() did not finish within {timeout}s")
            if not self.step():
                self._wait_inbox(0.05)
        return seqs

    # ---- loop -------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            try:
                if not self.step():
                    self._wait_inbox(0.5)
            except Exception:  # an engine bug must not leave clients hanging: fail everything in flight
                log.exception("engine step failed")
                self._fail_all("internal engine error (see the engine log)")

    def _wait_inbox(self, timeout: float) -> None:
        try:
            item = self._inbox.get(timeout=timeout)
        except queue.Empty:
            return
        self._handle(item)

    def _drain(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            self._handle(item)

    def _handle(self, msg: InboxMessage) -> None:
        match msg:
            case AddSequence(seq):
                self._by_id[seq.request_id] = seq
                self.metrics.prompt_tokens.inc(len(seq.prompt))
                self.scheduler.add(seq)
            case AbortRequest(request_id):
                self._abort(request_id)
            case Published(seq):
                held = self._held.pop(seq.seq_id, None)
                if held is not None:
                    self.blocks.free_seq(held)
            case Pulled(seq):
                self._pulled(seq)
            case Wake():
                pass

    def step(self) -> bool:
        """Run one step; False when there was nothing to do."""
        self._drain()
        self._admit_pulls()
        batch = self.scheduler.schedule_prefill()
        prefill = bool(batch)
        if not prefill:
            batch = self.scheduler.schedule_decode()
        self._update_gauges()
        if not batch:
            return False
        t0 = time.perf_counter()
        inputs = [SeqInput(s.tokens[s.num_computed:], s.num_computed, s.block_table) for s in batch]
        publisher = self.publisher if prefill else None
        pubs = [s for s in batch if s.publish] if publisher is not None else []
        states: list[PublishState] = []
        hook = None
        if publisher is not None and pubs:
            states = publisher.begin([PublishRequest(s.request_id, s.prompt, s.block_table, cache_salt=s.cache_salt)
                                       for s in pubs])
            for s, state in zip(pubs, states, strict=True):
                s.publish_state = state
            hook = publisher.layer_done
        if prefill:
            for s in batch:
                self.metrics.prefix_hit_tokens.inc(s.num_cached_tokens)
                self.metrics.computed_tokens.inc(len(s) - s.num_computed)
        logits = self.model.forward(inputs, self.cache, self.layout, layer_hook=hook)
        tokens = self.sampler.sample(logits, batch)
        if self.record_logits:
            for s, row in zip(batch, logits, strict=True):
                s.logits = (s.logits or []) + [row.clone()]
        for s in batch:
            s.num_computed = len(s)
        if publisher is not None and pubs:
            first = {s.seq_id: t for s, t in zip(batch, tokens, strict=True)}
            by_state = {id(s.publish_state): s for s in pubs}
            publisher.end(states, [first[s.seq_id] for s in pubs],
                          lambda state: self._inbox.put(Published(by_state[id(state)])))
        for s, tok in zip(batch, tokens, strict=True):
            if prefill and not s.publish:
                self.scheduler.start_decoding(s)
            self._emit(s, tok)
        self.metrics.step_time.labels("prefill" if prefill else "decode").observe(time.perf_counter() - t0)
        return True

    def _emit(self, seq: Sequence, tok: int) -> None:
        seq.output.append(tok)
        self.metrics.generated_tokens.inc()
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
            self.metrics.ttft.observe(seq.first_token_time - seq.arrival)
        p = seq.params
        reason = None
        if seq.publish:
            reason = "length"  # prefill role: the first token only
        elif len(seq.output) >= p.max_tokens:
            reason = "length"
        elif not p.ignore_eos and tok in p.stop_token_ids:
            reason = "stop"
        elif len(seq) >= self.cfg.max_model_len:
            reason = "length"
        if reason is not None:
            self._finish(seq, reason)
        if seq.on_token is not None:
            seq.on_token(seq, tok, reason is not None)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        self.scheduler.finish(seq, reason)
        seq.error = error
        self.sampler.forget(seq)
        self._by_id.pop(seq.request_id, None)
        self.metrics.requests.labels("error" if error else reason).inc()
        if seq.block_table and seq.publish_state is not None and seq.publish_state.holds_blocks:
            self._held[seq.seq_id] = seq  # freed when the publisher reports the request settled
        elif seq.block_table:
            self.blocks.free_seq(seq)

    def _fail_all(self, error: str) -> None:
        for seq in self.scheduler.active():
            self._fail(seq, error)

    def _fail(self, seq: Sequence, error: str) -> None:
        self.scheduler.remove(seq)
        self._finish(seq, "error", error)
        if seq.on_token is not None:
            seq.on_token(seq, -1, True)

    def _abort(self, request_id: str) -> None:
        if self.publisher is not None:  # aborted between abort()'s call and its begin(): its publish stops here
            self.publisher.abort(request_id, f"request {request_id} was aborted")
        seq = self._by_id.get(request_id)
        if seq is None or seq.status is Status.FINISHED:
            return
        if seq.status is Status.PULLING and seq.pull_state is not None:
            if self.puller is not None and not seq.pull_state.cancelled:  # a wait in the store ends at once
                self.puller.cancel(seq.pull_state, f"request {request_id} was aborted while pulling")
            return  # blocks freed when the puller reports back
        self._fail(seq, "aborted")

    def _update_gauges(self) -> None:
        self.metrics.running.set(len(self.scheduler.running))
        self.metrics.waiting.set(len(self.scheduler.waiting))
        self.metrics.free_blocks.set(self.blocks.num_free)

    # ---- decode role ------------------------------------------------------------------------------------
    def _check_params(self, seq: Sequence) -> None:
        kp = seq.kv_params
        if kp is None:
            return
        if kp.compat_hash != self.compat_hash:
            raise ValueError(f"kv_transfer_params.compat_hash {kp.compat_hash} does not match this engine's "
                             f"{self.compat_hash} (model {self.model_cfg.model_id!r}); route the request to a "
                             f"compatible decode worker")
        if seq.prefix_load and not 0 < kp.num_tokens < len(seq.prompt):
            raise ValueError(f"a prefix load of {kp.num_tokens} tokens for a prompt of {len(seq.prompt)}")
        if not seq.prefix_load and kp.num_tokens != len(seq.prompt):
            raise ValueError(f"kv_transfer_params.num_tokens {kp.num_tokens} != prompt length {len(seq.prompt)}")
        if self.puller is None:
            raise ValueError("this engine cannot pull KV (start it with --role decode and a --store address)")

    def _admit_pulls(self) -> None:
        puller = self.puller
        if puller is None:
            return
        for seq in self.scheduler.schedule_pulls():
            assert seq.kv_params is not None  # schedule_pulls admits only sequences with params
            self.metrics.prefix_hit_tokens.inc(seq.num_cached_tokens)
            self.metrics.transfer.pull_skipped_tokens.inc(seq.num_cached_tokens)
            seq.pull_state = PullState(seq.kv_params, seq.block_table, skip_tokens=seq.num_cached_tokens,
                                       fetch_first_token=not seq.prefix_load, tenant=seq.cache_salt,
                                       tokens=tuple(seq.prompt) if seq.prefix_load else ())
            puller.start(seq.pull_state, time.monotonic() + self.cfg.pull_timeout_s,
                         functools.partial(self._on_pulled, seq))

    def _on_pulled(self, seq: Sequence, state: PullState) -> None:
        self._inbox.put(Pulled(seq))

    def _pulled(self, seq: Sequence) -> None:
        state = seq.pull_state
        assert state is not None and state.settled  # Pulled is sent after the state settled
        metrics = self.metrics.transfer
        if state.cancelled:
            self.scheduler.pull_finished(seq, ok=False)
            self.blocks.forget(seq)
            self._finish(seq, "abort", "aborted")
            if seq.on_token is not None:
                seq.on_token(seq, -1, True)
            return
        if seq.prefix_load:
            self._prefix_loaded(seq, state)
            return
        if state.failure is None and state.first_token is not None:
            metrics.pulls.labels("ok", "").inc()
            metrics.pull_time.observe((state.finished or time.monotonic()) - state.started)
            seq.output = []
            self.scheduler.pull_finished(seq, ok=True)
            self._emit(seq, state.first_token)
            return
        failure = state.failure or TransferFailure.from_exception(RuntimeError("the pull gave no first token"))
        log.warning("pull for %s failed (%s); policy %s", seq.request_id, failure, self.cfg.failure_policy)
        self.scheduler.pull_finished(seq, ok=False)
        self.blocks.forget(seq)
        seq.output = []
        seq.num_computed = seq.num_cached_tokens = 0
        if self.cfg.failure_policy == "fail":
            metrics.pulls.labels("fail", failure.code.value).inc()
            self._finish(seq, "error", f"KV pull failed: {failure} (policy 'fail')")
            if seq.on_token is not None:
                seq.on_token(seq, -1, True)
            return
        metrics.pulls.labels("recompute", failure.code.value).inc()
        seq.recomputed = failure
        seq.kv_params = None
        self.scheduler.requeue_front(seq)

    def _prefix_loaded(self, seq: Sequence, state: PullState) -> None:
        """A prefix load settled: its blocks enter this engine's prefix cache (loaded) or are dropped (failed), and
        ``seq`` goes back to the head of the queue, where its prefill step finds the loaded blocks as cache hits
        and computes only the rest (failed: all of it; the reason is counted, the request never fails for it)."""
        kp = state.params
        self.scheduler.pull_finished(seq, ok=False)
        if state.failure is None:
            self.metrics.transfer.pulls.labels("ok", "").inc()
            self.metrics.transfer.pull_time.observe((state.finished or time.monotonic()) - state.started)
            self.metrics.prefix_loaded_tokens.labels(
                "own" if state.source == self.puller.store_address else "other").inc(kp.num_tokens)  # type: ignore[union-attr]
            self.blocks.register(seq, kp.num_tokens)
            self.blocks.free_seq(seq)
        else:
            log.warning("prefix load for %s failed (%s): it computes the whole prompt", seq.request_id, state.failure)
            self.metrics.transfer.pulls.labels("recompute", state.failure.code.value).inc()
            seq.recomputed = state.failure
            self.blocks.forget(seq)
        seq.kv_params, seq.prefix_load = None, False
        seq.output = []
        seq.num_computed = seq.num_cached_tokens = 0
        self.scheduler.requeue_front(seq)

