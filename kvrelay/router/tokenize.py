"""The prompt's token ids as the workers compute them, for cache-aware routing.

The router names a prompt's blocks by hashing its token ids (kvindex.py), so they must be the ids the
worker computes, its chat template included.  A worker that tokenizes for others (vLLM's ``POST
/tokenize``: chat ``messages`` through the checkpoint's own chat template, a text ``prompt`` as its
/v1/completions does) is asked once per prompt, and its answers are kept in an LRU bounded in entries
and in tokens.  The question has a short deadline (``deadline_s``): past it the request is routed with
the local tokenization (kvrelay.tokenizer: ``--tokenizer``'s tokenizer.json, else byte-level; chat
through the reference engine's template), and the answer, when it comes, serves the next request with
that prompt.  A worker that answers 404 or 405 without an OpenAI error body has no /tokenize (the
reference engine, the test fakes): it is not asked again for ``recheck_s``.  A token-id prompt is used
as is.

Owns: `PromptTokens` (the questions, their cache, the fallback).  Must not touch: routing, the index.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp

from kvrelay.tokenizer import Tokenizer, apply_chat_template

log = logging.getLogger("kvrelay.router")

TOKENIZE = "/tokenize"
# the request fields that change a prompt's tokens, forwarded to /tokenize as the client sent them
CHAT_FIELDS = ("model", "messages", "add_generation_prompt", "continue_final_message", "add_special_tokens",
               "chat_template", "chat_template_kwargs", "tools")
COMPLETION_FIELDS = ("model", "prompt", "add_special_tokens")
NO_ENDPOINT = (404, 405, 501)


class PromptTokens:
    def __init__(self, local: Tokenizer, *, deadline_s: float = 0.1, max_entries: int = 4096,
                 max_tokens: int = 1 << 20, max_pending: int = 64, ask_timeout_s: float = 10.0,
                 recheck_s: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        if not deadline_s >= 0 or max_entries < 1 or max_tokens < 1 or max_pending < 0:
            raise ValueError(f"PromptTokens: deadline_s {deadline_s} must be >= 0 seconds, max_entries "
                             f"{max_entries} and max_tokens {max_tokens} >= 1, max_pending {max_pending} >= 0")
        self.local = local
        self.deadline_s, self.ask_timeout_s, self.recheck_s = deadline_s, ask_timeout_s, recheck_s
        self.max_entries, self.max_tokens, self.max_pending = max_entries, max_tokens, max_pending
        self.clock = clock
        self._cache: OrderedDict[bytes, list[int]] = OrderedDict()
        self._cached_tokens = 0
        self._pending: dict[bytes, asyncio.Task[list[int] | None]] = {}
        self._lacking: dict[str, float] = {}  # worker URL -> when it showed it has no /tokenize
        # where each prompt's tokens came from: "given" (token ids), "cached", "worker" (answered within the
        # deadline), "local" (no worker tokenizes, or it failed or was late); "unreadable": None
        self.counts = dict.fromkeys(("given", "cached", "worker", "local", "unreadable"), 0)

    async def tokens(self, path: str, body: dict, workers: Sequence[str] = (),
                     session: aiohttp.ClientSession | None = None) -> list[int] | None:
        """The prompt's token ids as ``workers`` (URLs, asked in order) compute them; None if the router cannot
        tell (routed without cache credit: the engine reports the error)."""
        ids, question = _question(path, body)
        if ids is not None:
            self.counts["given"] += 1
            return ids
        if question is None:
            self.counts["unreadable"] += 1
            return None
        key = hashlib.blake2b(json.dumps(question, sort_keys=True, separators=(",", ":")).encode() +
                              path.encode(), digest_size=16).digest()
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            self.counts["cached"] += 1
            return hit
        task = self._pending.get(key)
        worker = self._worker(workers) if session is not None else None
        if task is None and worker is not None and session is not None and len(self._pending) < self.max_pending:
            task = self._pending[key] = asyncio.create_task(self._ask(session, worker, question, key))
            task.add_done_callback(lambda t: self._done(key, t))
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=self.deadline_s)  # a late answer still fills the cache
            got = task.result() if done and not task.cancelled() and task.exception() is None else None
            if got is not None:
                self.counts["worker"] += 1
                return got
        self.counts["local"] += 1
        return self._local(path, body)

    def _done(self, key: bytes, task: asyncio.Task[list[int] | None]) -> None:
        self._pending.pop(key, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("asking a worker to tokenize failed: %r", task.exception())

    def _worker(self, workers: Sequence[str]) -> str | None:
        now = self.clock()
        for url in workers:
            since = self._lacking.get(url)
            if since is None or now - since >= self.recheck_s:
                return url
        return None

    async def _ask(self, session: aiohttp.ClientSession, worker: str, question: dict, key: bytes) -> list[int] | None:
        """POST /tokenize to ``worker``; the ids (also cached), or None (not cached) if it did not answer them."""
        try:
            async with session.post(worker + TOKENIZE, json=question,
                                    timeout=aiohttp.ClientTimeout(total=self.ask_timeout_s)) as r:
                try:
                    answer: Any = await r.json(content_type=None)
                except ValueError:
                    answer = None
                status = r.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.debug("%s%s failed: %r; the router tokenizes this prompt itself", worker, TOKENIZE, exc)
            return None
        if status in NO_ENDPOINT and not (isinstance(answer, dict) and "error" in answer):
            self._lacking[worker] = self.clock()
            log.info("%s has no %s (it answered %d): the router tokenizes its prompts itself", worker, TOKENIZE,
                     status)
            return None
        self._lacking.pop(worker, None)
        ids = answer.get("tokens") if status == 200 and isinstance(answer, dict) else None
        if not (isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
            log.debug("%s%s answered %d %.200r: the router tokenizes this prompt itself", worker, TOKENIZE, status,
                      answer)
            return None
        self._put(key, ids)
        return ids

    def _put(self, key: bytes, ids: list[int]) -> None:
        if len(ids) > self.max_tokens:
            return
        old = self._cache.pop(key, None)
        if old is not None:
            self._cached_tokens -= len(old)
        self._cache[key] = ids
        self._cached_tokens += len(ids)
        while len(self._cache) > self.max_entries or self._cached_tokens > self.max_tokens:
            _, dropped = self._cache.popitem(last=False)
            self._cached_tokens -= len(dropped)

    def _local(self, path: str, body: dict) -> list[int] | None:
        try:
            if _is_chat(path):
                return self.local.encode(apply_chat_template(body["messages"]))
            prompt = _text_prompt(body)
            return self.local.encode(prompt) if prompt is not None else None
        except (ValueError, TypeError, AttributeError, KeyError):
            return None

    async def close(self) -> None:
        """Cancel the questions still out (the router's sessions close next)."""
        pending = list(self._pending.values())
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def _is_chat(path: str) -> bool:
    return path.endswith("/chat/completions")


def _text_prompt(body: dict) -> str | None:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]  # a batch of one
    return p if isinstance(p, str) else None


def _question(path: str, body: dict) -> tuple[list[int] | None, dict | None]:
    """(token ids the request gives, None) or (None, the /tokenize body for its prompt) or (None, None) if the
    prompt is none the router can read."""
    if _is_chat(path):
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return None, None
        return None, {f: body[f] for f in CHAT_FIELDS if f in body}
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], list):
        p = p[0]  # a batch of one
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return p, None
    text = _text_prompt(body)
    if text is None:
        return None, None
    return None, {**{f: body[f] for f in COMPLETION_FIELDS if f in body}, "prompt": text}
