"""The reference engine as a Dynamo `LLMEngine`: Dynamo's Worker drives it, its KV moves through kvrelay.

Dynamo's frontend tokenizes, picks a prefill worker and sends it the request with ``max_tokens=1``;
the prefill's last chunk carries ``disaggregated_params``, which the frontend's prefill router hands
to a decode worker as ``request["prefill_result"]["disaggregated_params"]``.  Here those params are
``{"kv_transfer_params": KVTransferParams}``: the prefill publishes its prompt's KV to the store layer
by layer (kvrelay.connector's publisher) and the decode pulls it (its puller), exactly as behind
`kvrelay router`.  A decode request without them (a health probe, or no prefill worker) computes its
prompt locally.

Owns: the translation between Dynamo's request/response dicts and the reference engine's `Sequence`, and
building one from `kvrelay dynamo-worker`'s flags (flags.py) without ``--engine-url``.
Must not touch: the engine's internals (`Engine.add` / `abort` and token callbacks only), Dynamo's files.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncGenerator
from typing import Any

import msgspec
from dynamo.common.backend import EngineConfig, LLMEngine
from dynamo.common.backend.engine import LlmRegistration
from dynamo.common.backend.metrics import register_engine_registry
from dynamo.common.backend.publisher import KvEventSource, ZmqSource
from dynamo.common.constants import DisaggregationMode
from dynamo.llm.exceptions import EngineShutdown, InvalidArgument

from kvrelay.connector import PublishPhase
from kvrelay.engines.dynamo import env, flags, model_dir
from kvrelay.engines.dynamo.common import MODES, PARAMS_KEY, sampling_params
from kvrelay.engines.reference.engine import Engine
from kvrelay.engines.reference.sequence import Sequence, Status
from kvrelay.params import KVTransferParams

log = logging.getLogger("kvrelay.dynamo")

__all__ = ["ReferenceDynamoEngine", "decode_params"]


def decode_params(request: dict[str, Any]) -> KVTransferParams | None:
    """The prefill's `KVTransferParams` forwarded by the frontend, or None (compute the prompt here)."""
    result = request.get("prefill_result")
    if not isinstance(result, dict):
        return None
    dp = result.get("disaggregated_params")
    if isinstance(dp, dict) and PARAMS_KEY in dp and dp[PARAMS_KEY] is None:
        log.warning("prefill could not publish (%s): computing the prompt here", dp.get("reason", "?"))
        return None
    if not isinstance(dp, dict) or not isinstance(dp.get(PARAMS_KEY), dict):
        raise InvalidArgument("prefill_result.disaggregated_params carries no kv_transfer_params: the prefill "
                              "worker is not a kvrelay worker (every worker of a model must be)")
    try:
        return KVTransferParams.from_dict(dp[PARAMS_KEY])
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def _handoff(seq: Sequence) -> dict[str, Any]:
    """The prefill's ``disaggregated_params``: its `KVTransferParams`, or None when the store refused the
    prompt (pool full, store down): the decode then computes the prompt itself."""
    state = seq.publish_state
    if state is None or state.phase is PublishPhase.REFUSED:
        return {PARAMS_KEY: None, "reason": "the kvrelay store refused this prompt's KV (pool full or down)"}
    return {PARAMS_KEY: msgspec.to_builtins(state.params)}


class ReferenceDynamoEngine(LLMEngine):
    """One reference `Engine` (built by `build`, started in `start`) serving Dynamo requests in ``mode``."""

    def __init__(self, args: argparse.Namespace, build: Any, eos: tuple[int, ...], kv_events: list[str],
                 served_model_name: str) -> None:
        """``args``: `kvrelay engine`'s flags; ``build(args) -> (Engine, Tokenizer)``; ``eos``: stop ids."""
        self.args, self._build, self.eos, self.kv_events = args, build, eos, kv_events
        self.served_model_name = served_model_name
        self.mode = MODES[args.role]
        self.engine: Engine | None = None
        self._live: dict[str, Sequence] = {}  # prefill: requests whose KV may still be publishing

    @classmethod
    async def from_args(cls, argv: list[str] | None = None) -> Any:
        return cls.from_flags(flags.parse(argv))

    @classmethod
    def from_flags(cls, parsed: flags.WorkerFlags) -> tuple[ReferenceDynamoEngine, Any]:
        """(engine, WorkerConfig) for Dynamo's `run`: the reference engine built from its own flags, exactly
        as `kvrelay engine` takes them; ValueError naming a bad flag."""
        from kvrelay.engines.reference.server import build_engine, check_args
        from kvrelay.engines.reference.server import build_parser as engine_parser

        args, rest, name = parsed
        if args.engine_url:
            raise ValueError(f"--engine-url {args.engine_url!r}: the worker forwards to that server "
                             "(RemoteDynamoEngine), it runs no engine in-process")
        try:
            eng = engine_parser().parse_args(["--role", args.role, "--checkpoint", args.checkpoint, "--port", "0",
                                              *rest])
        except SystemExit as exc:
            raise ValueError(f"bad engine flags {' '.join(rest)!r} (see `kvrelay engine --help`)") from exc
        if args.role != "colocated" and not eng.store:
            raise ValueError(f"--role {args.role} needs --store tcp://127.0.0.1:PORT (a running `kvrelay store`)")
        check_args(eng)
        env.apply(env.dynamo_env(args.discovery, args.event_broker, args.metrics_port, args.advertise_host))
        if eng.threads > 0:
            import torch
            torch.set_num_threads(eng.threads)
        engine = cls(eng, build_engine, model_dir.stop_token_ids(args.checkpoint), args.kv_events, name)
        return engine, flags.worker_config(parsed)

    async def start(self, worker_id: int) -> EngineConfig:
        del worker_id
        self.engine, _tok = await asyncio.to_thread(self._build, self.args)
        self.engine.start()
        cfg = self.engine.cfg
        return EngineConfig(model=str(self.args.checkpoint), served_model_name=self.served_model_name,
                            llm=LlmRegistration(context_length=cfg.max_model_len, kv_cache_block_size=cfg.block_size,
                                                total_kv_blocks=cfg.num_blocks, max_num_seqs=cfg.max_num_seqs,
                                                max_num_batched_tokens=cfg.max_num_batched_tokens))

    async def register_prometheus(self, metrics: Any) -> None:
        if self.engine is not None:  # kvrelay_engine_* (transfers included) on the worker's /metrics
            register_engine_registry(metrics, self.engine.metrics.registry, prefix_filters=["kvrelay_"])

    async def kv_event_sources(self) -> list[KvEventSource]:
        """Dynamo's KV router subscribes to these (vLLM's KV-event wire format on a ZMQ PUB socket)."""
        return [ZmqSource(endpoint=ep) for ep in self.kv_events]

    async def generate(self, request: Any, context: Any) -> AsyncGenerator[Any, None]:
        engine = self.engine
        if engine is None:
            raise EngineShutdown("the kvrelay engine is not running")
        prompt = [int(t) for t in request.get("token_ids") or []]
        params = sampling_params(request, self.eos, engine.cfg.max_model_len)
        publish = self.mode is DisaggregationMode.PREFILL
        kv = decode_params(request) if self.mode is DisaggregationMode.DECODE else None
        if publish:
            params.max_tokens = 1
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[tuple[int, bool]] = asyncio.Queue()

        def on_token(_seq: Sequence, tok: int, fin: bool) -> None:  # the engine thread
            loop.call_soon_threadsafe(q.put_nowait, (tok, fin))

        seq = Sequence(prompt, params, request_id=f"dyn-{context.id()}", kv_params=kv, publish=publish,
                       on_token=on_token)
        try:
            engine.add(seq)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if publish:
            self._live[seq.request_id] = seq
        n = 0
        try:
            while True:
                tok, fin = await q.get()
                if seq.error:
                    raise EngineShutdown(f"kvrelay engine: {seq.error}")
                chunk: dict[str, Any] = {"token_ids": [tok] if tok >= 0 else [], "index": 0}
                n += tok >= 0
                if fin:
                    chunk["finish_reason"] = seq.finish_reason or "stop"
                    chunk["completion_usage"] = {"prompt_tokens": len(prompt), "completion_tokens": n,
                                                 "total_tokens": len(prompt) + n}
                    if publish:
                        chunk["disaggregated_params"] = _handoff(seq)
                yield chunk
                if fin:
                    return
        finally:
            if seq.finish_reason is None:  # cancelled or the stream dropped
                engine.abort(seq.request_id)

    async def is_quiescent(self) -> bool:
        """Prefill drain at shutdown: True once no request is running or still publishing its KV."""
        for rid, seq in list(self._live.items()):
            state = seq.publish_state
            if seq.status is Status.FINISHED and (state is None or state.phase is not PublishPhase.PUBLISHING):
                del self._live[rid]
        return not self._live

    async def abort(self, context: Any) -> None:
        if self.engine is not None:
            self.engine.abort(f"dyn-{context.id()}")

    async def cleanup(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            await asyncio.to_thread(engine.stop)
