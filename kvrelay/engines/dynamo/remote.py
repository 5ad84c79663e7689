"""A kvrelay-backed OpenAI server as a Dynamo `LLMEngine`: vLLM with kvrelay's connector (or a `kvrelay
engine`), reached over HTTP on 127.0.0.1 (``kvrelay dynamo-worker --engine-url URL``).

Dynamo's own vLLM worker (``python -m dynamo.vllm``) accepts only the KV connectors it has a P/D protocol
for (NixlConnector, MooncakeConnector, LMCacheMPConnector); this adapter needs none of that: it speaks
kvrelay's P/D protocol to the server.  A prefill request goes out with ``max_tokens: 1`` and
``kv_transfer_params: {"do_remote_decode": true, "kvrelay_request_id": ID}``; the server's answer's
``kv_transfer_params`` become the ``disaggregated_params`` the frontend hands to a decode worker, which
sends them back as the decode leg's ``kv_transfer_params`` (vLLM's proxy convention): the decode server
pulls the prompt's KV from the kvrelay store.  Token ids in, token ids out (``return_token_ids``).

Owns: that translation, the HTTP calls, and building one from `kvrelay dynamo-worker`'s flags (flags.py)
with ``--engine-url``.  Must not touch: the server, Dynamo's files.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
from dynamo.common.backend import EngineConfig, LLMEngine
from dynamo.common.backend.engine import LlmRegistration
from dynamo.common.backend.publisher import KvEventSource, ZmqSource
from dynamo.common.constants import DisaggregationMode
from dynamo.llm.exceptions import EngineShutdown, InvalidArgument

from kvrelay.engines.dynamo import env, flags, model_dir
from kvrelay.engines.dynamo.common import MODES, PARAMS_KEY, sampling_params
from kvrelay.params import DO_REMOTE_DECODE, RELAY_ID


class RemoteDynamoEngine(LLMEngine):
    """Forwards Dynamo requests for ``role`` to the OpenAI server at ``url`` (127.0.0.1)."""

    def __init__(self, url: str, role: str, checkpoint: str, served_model_name: str, eos: tuple[int, ...],
                 kv_events: list[str], max_model_len: int, timeout: float = 600.0) -> None:
        self.url, self.mode, self.checkpoint = url.rstrip("/"), MODES[role], checkpoint
        self.served_model_name, self.eos, self.kv_events = served_model_name, eos, kv_events
        self.max_model_len, self.timeout = max_model_len, timeout
        self.model = ""  # the server's model name, from GET /v1/models
        self._http: aiohttp.ClientSession | None = None

    @classmethod
    async def from_args(cls, argv: list[str] | None = None) -> Any:
        return cls.from_flags(flags.parse(argv))

    @classmethod
    def from_flags(cls, parsed: flags.WorkerFlags) -> tuple[RemoteDynamoEngine, Any]:
        """(engine, WorkerConfig) for Dynamo's `run`, forwarding to ``--engine-url``; ValueError naming a bad
        flag."""
        args, rest, name = parsed
        if not args.engine_url:
            raise ValueError("RemoteDynamoEngine forwards to a running server: give --engine-url http://127.0.0.1:PORT")
        if rest:
            raise ValueError(f"--engine-url forwards to a running server: engine flags {' '.join(rest)!r} belong to "
                             "that server's own command line")
        if not re.fullmatch(r"http://127\.0\.0\.1:\d{1,5}/?", args.engine_url):
            raise ValueError(f"--engine-url {args.engine_url!r} is not http://127.0.0.1:PORT (loopback only)")
        env.apply(env.dynamo_env(args.discovery, args.event_broker, args.metrics_port, args.advertise_host))
        engine = cls(args.engine_url, args.role, args.checkpoint, name, model_dir.stop_token_ids(args.checkpoint),
                     args.kv_events, max_model_len=4096)
        return engine, flags.worker_config(parsed)

    async def start(self, worker_id: int) -> EngineConfig:
        del worker_id
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        try:
            async with self._http.get(f"{self.url}/v1/models") as r:
                models = (await r.json())["data"]
        except (aiohttp.ClientError, KeyError, ValueError, TimeoutError) as exc:
            raise EngineShutdown(f"--engine-url {self.url}: no OpenAI server answers GET /v1/models ({exc!r})") \
                from None
        self.model = models[0]["id"]
        self.max_model_len = int(models[0].get("max_model_len") or self.max_model_len)
        return EngineConfig(model=self.checkpoint, served_model_name=self.served_model_name,
                            llm=LlmRegistration(context_length=self.max_model_len))

    async def kv_event_sources(self) -> list[KvEventSource]:
        return [ZmqSource(endpoint=ep) for ep in self.kv_events]

    def _body(self, request: Any) -> dict[str, Any]:
        prompt = [int(t) for t in request.get("token_ids") or []]
        p = sampling_params(request, self.eos, self.max_model_len)
        body: dict[str, Any] = {"model": self.model, "prompt": prompt, "max_tokens": p.max_tokens,
                                "temperature": p.temperature, "ignore_eos": p.ignore_eos,
                                "stop_token_ids": list(p.stop_token_ids), "return_token_ids": True}
        if p.seed is not None:
            body["seed"] = p.seed
        if self.mode is DisaggregationMode.PREFILL:
            body |= {"max_tokens": 1, PARAMS_KEY: {DO_REMOTE_DECODE: True, RELAY_ID: uuid.uuid4().hex}}
        elif self.mode is DisaggregationMode.DECODE:
            handoff = ((request.get("prefill_result") or {}).get("disaggregated_params") or {}).get(PARAMS_KEY)
            if isinstance(handoff, dict):
                body[PARAMS_KEY] = handoff  # the prefill server's answer, with do_remote_prefill
        return body

    async def generate(self, request: Any, context: Any) -> AsyncGenerator[Any, None]:
        body = self._body(request)
        n_prompt = len(body["prompt"])
        if self.mode is DisaggregationMode.PREFILL:  # one token and the handoff: one JSON answer
            out = await self._post(body)
            choice = out["choices"][0]
            toks = list(choice.get("token_ids") or [])
            yield {"token_ids": toks, "index": 0, "finish_reason": choice.get("finish_reason") or "length",
                   "completion_usage": _usage(n_prompt, len(toks)),
                   "disaggregated_params": {PARAMS_KEY: out.get(PARAMS_KEY)}}
            return
        n = 0
        async for chunk in self._stream(body | {"stream": True}):
            choice = (chunk.get("choices") or [{}])[0]
            toks = list(choice.get("token_ids") or [])
            n += len(toks)
            out_chunk: dict[str, Any] = {"token_ids": toks, "index": 0}
            if choice.get("finish_reason"):
                out_chunk |= {"finish_reason": choice["finish_reason"], "completion_usage": _usage(n_prompt, n)}
            yield out_chunk
            if context.is_stopped():
                return

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise EngineShutdown("the worker is stopped")
        return self._http

    async def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            async with self._session().post(f"{self.url}/v1/completions", json=body) as r:
                out = await r.json(content_type=None)
                if r.status >= 400:
                    raise _error(r.status, out)
                return out
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise EngineShutdown(f"{self.url}: {exc!r}") from None

    async def _stream(self, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        try:
            async with self._session().post(f"{self.url}/v1/completions", json=body) as r:
                if r.status >= 400:
                    raise _error(r.status, await r.json(content_type=None))
                async for raw in r.content:
                    line = raw.decode().strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    if "error" in chunk:
                        raise EngineShutdown(f"{self.url}: {chunk['error']}")
                    yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise EngineShutdown(f"{self.url}: {exc!r}") from None

    async def cleanup(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            await http.close()


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _error(status: int, body: Any) -> Exception:
    msg = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
    text = f"the engine answered {status}: {msg or body}"
    return InvalidArgument(text) if 400 <= status < 500 else EngineShutdown(text)
