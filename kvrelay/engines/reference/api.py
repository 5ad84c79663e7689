"""OpenAI request parsing and response shaping for the HTTP server.

Owns: turning /v1/completions and /v1/chat/completions bodies into prompts + `SamplingParams` (+ the
decode role's `kv_transfer_params`), and building response / SSE chunk bodies.  Extensions beyond
OpenAI: ``prompt`` may be a list of token ids (as in vLLM); ``cache_salt`` (as in vLLM) salts the prompt's
KV addresses, here and in the store (kvrelay.keys); choices carry ``token_ids``; responses carry
``kv_transfer_params`` (prefill role).  Must not touch: the engine.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from kvrelay.engines.reference.sequence import SamplingParams
from kvrelay.keys import check_salt
from kvrelay.params import DO_REMOTE_PREFILL, PREFIX_STORE, PREFIX_TOKENS, STORE_ADDRESS, KVTransferParams
from kvrelay.tokenizer import Tokenizer, apply_chat_template


@dataclass(slots=True)
class ParsedRequest:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    stream: bool
    chat: bool
    kv_params: KVTransferParams | None
    cache_salt: str = ""  # the tenant's salt (as vLLM's OpenAI server takes it): part of every KV address


def parse(body: Any, tok: Tokenizer, chat: bool) -> ParsedRequest:
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list of {role, content} objects")
        prompt = tok.encode(apply_chat_template(msgs))
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]  # a batch of one
        if isinstance(p, str):
            prompt = tok.encode(p)
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            prompt = list(p)
        else:
            raise ValueError("'prompt' must be a string or a list of token ids (batches of several prompts are "
                             "not supported: send one request per prompt)")
    if not prompt:
        raise ValueError("the prompt is empty: send at least one token")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:  # absent or null (OpenAI clients send null for "the default")
        max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = 16
    temperature = body.get("temperature", 1.0 if body.get("seed") is not None else 0.0)
    if temperature is None:
        temperature = 0.0
    if int(body.get("n", 1)) != 1:
        raise ValueError(f"n={body.get('n')} is not supported; send n=1")
    stop_ids = body.get("stop_token_ids") or ()
    params = SamplingParams(max_tokens=max_tokens, temperature=float(temperature), seed=body.get("seed"),
                            ignore_eos=bool(body.get("ignore_eos", False)), stop_token_ids=tuple(stop_ids))
    kvp = body.get("kv_transfer_params")
    kv_params = KVTransferParams.from_dict(kvp) if isinstance(kvp, dict) and "block_hashes" in kvp else None
    rid = str(body.get("request_id") or (kv_params.request_id if kv_params else "") or
              f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}")
    salt = check_salt(body.get("cache_salt"))
    return ParsedRequest(rid, prompt, params, bool(body.get("stream", False)), chat, kv_params, salt)


def wants_remote_prefill(body: dict) -> bool:
    """A decode leg whose prefill runs concurrently elsewhere: ``kv_transfer_params`` is the light form
    ``{"do_remote_prefill": true}`` and ``request_id`` names the prefill leg's request."""
    kvp = body.get("kv_transfer_params")
    if not (isinstance(kvp, dict) and kvp.get(DO_REMOTE_PREFILL) and "block_hashes" not in kvp):
        return False
    if not body.get("request_id"):
        raise ValueError("kv_transfer_params.do_remote_prefill needs the prefill leg's 'request_id' in the body")
    return True


def remote_store(body: dict) -> str:
    """The store a decode leg's light ``kv_transfer_params`` name (``store_address``: its prefill's, with a store
    on every host), or "" (this engine's own); ValueError if it is not a store's control address."""
    kvp = body.get("kv_transfer_params")
    store = kvp.get(STORE_ADDRESS, "") if isinstance(kvp, dict) else ""
    if not isinstance(store, str) or (store and not store.startswith("tcp://")):
        raise ValueError(f"kv_transfer_params.{STORE_ADDRESS} {store!r} is not a store's control address "
                         f"(tcp://HOST:PORT)")
    return store


def prefix_hint(body: dict) -> tuple[str, int] | None:
    """A router's hint that a store holds the prompt's first tokens (``kv_transfer_params``: ``PREFIX_STORE``, its
    control address or "" for this engine's own store, and ``PREFIX_TOKENS``), or None; ValueError if malformed."""
    kvp = body.get("kv_transfer_params")
    if not isinstance(kvp, dict) or PREFIX_TOKENS not in kvp or kvp.get(DO_REMOTE_PREFILL) or "block_hashes" in kvp:
        return None
    store, tokens = kvp.get(PREFIX_STORE, ""), kvp[PREFIX_TOKENS]
    if not isinstance(store, str) or (store and not store.startswith("tcp://")):
        raise ValueError(f"kv_transfer_params.{PREFIX_STORE} {store!r} is not a store's control address "
                         f"(tcp://HOST:PORT)")
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        raise ValueError(f"kv_transfer_params.{PREFIX_TOKENS} {tokens!r} is not a number of prompt tokens")
    return store, tokens


def response(req: ParsedRequest, model: str, text: str, token_ids: list[int], finish: str | None,
             prompt_tokens: int, extra: dict | None = None) -> dict:
    if req.chat:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": finish, "token_ids": token_ids}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None, "token_ids": token_ids}
    body: dict[str, Any] = {
        "id": req.request_id, "object": "chat.completion" if req.chat else "text_completion",
        "created": int(time.time()), "model": model, "choices": [choice],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(token_ids),
                  "total_tokens": prompt_tokens + len(token_ids)},
    }
    if extra:
        body.update(extra)
    return body


def stream_chunk(req: ParsedRequest, model: str, text: str, token_ids: list[int], finish: str | None,
                 extra: dict | None = None) -> dict:
    if req.chat:
        choice: dict[str, Any] = {"index": 0, "delta": {"content": text}, "finish_reason": finish,
                                  "token_ids": token_ids}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None, "token_ids": token_ids}
    body: dict[str, Any] = {"id": req.request_id,
                            "object": "chat.completion.chunk" if req.chat else "text_completion",
                            "created": int(time.time()), "model": model, "choices": [choice]}
    if extra:
        body.update(extra)
    return body
