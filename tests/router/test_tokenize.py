"""The router tokenizes a prompt as its workers do: a worker that serves /tokenize (vLLM: its checkpoint's
chat template) is asked once per prompt, with a short deadline and a bounded cache; a worker without one
(the reference engine) gets the local tokenizer.  Fake workers with their own chat template stand in for
vLLM: their KV events name the blocks of *their* tokenization, so a chat prompt gets its cache credit only
if the router tokenized it as they do.
"""

import asyncio

import pytest
from aiohttp import web
from router_fakes import Worker, with_router

from kvrelay.events.publisher import EventPublisher
from kvrelay.events.wire import stored
from kvrelay.router.cacheview import CacheView, EventSource
from kvrelay.router.policy import Policy
from kvrelay.router.tokenize import PromptTokens
from kvrelay.tokenizer import ByteTokenizer, apply_chat_template

BS = 16
SYSTEM = "You are a careful assistant. Answer briefly, cite nothing, and keep the tone plain. " * 3


def template(messages: list[dict]) -> str:
    """The fake checkpoint's chat template: not the reference engine's."""
    return "".join(f"[{m['role'].upper()}] {m['content']} [END]" for m in messages) + "[ASSISTANT]"


def ids_of(text: str) -> list[int]:
    return [b + 300 for b in text.encode()]  # another vocabulary than the byte-level fallback's


class TokenizingWorker(Worker):
    """A fake worker that also serves vLLM's POST /tokenize with its own chat template; ``gate``: hold the
    answers until set."""

    def __init__(self, role: str, **kw) -> None:
        super().__init__(role, **kw)
        self.tokenize_bodies: list[dict] = []
        self.gate: asyncio.Event | None = None
        self.app.router.add_post("/tokenize", self.tokenize)

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.tokenize_bodies.append(body)
        if self.gate is not None:
            await self.gate.wait()
        text = template(body["messages"]) if "messages" in body else body["prompt"]
        ids = ids_of(text)
        return web.json_response({"count": len(ids), "max_model_len": 4096, "tokens": ids, "token_strs": None})


def blocks(tokens, base):
    out, parent = [], None
    for i in range(0, len(tokens) - len(tokens) % BS, BS):
        out.append(stored([base + i], parent, tokens[i:i + BS], BS, "GPU"))
        parent = base + i
    return out


async def _until(pred, timeout=20.0):
    for _ in range(int(timeout / 0.02)):
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


def _chat(turn: str) -> dict:
    return {"model": "m", "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": turn}],
            "max_tokens": 2}


async def _run(tokenizing: bool, fn, deadline_s: float = 10.0):
    """Two prefill and two decode fakes (all tokenizing with the fake template if ``tokenizing``); prefill
    worker 1 announces that it holds the blocks of the system prompt as the fake template tokenizes it.
    ``fn(ask, prefill_urls, cache)``; ``ask(body)`` returns the router's decision for it: (reason, the
    prefill worker's URL or None) (the prefill leg itself may be stopped unsent once the fake decode
    answered)."""
    make = TokenizingWorker if tokenizing else Worker
    pres = [make("prefill", params={"block_hashes": []}) for _ in range(2)]
    decs = [make("decode") for _ in range(2)]
    urls = [await w.start() for w in pres + decs]
    pub = EventPublisher().start()
    cache = CacheView([EventSource(urls[1], pub.endpoint, pub.replay_endpoint)], tokenize_deadline_s=deadline_s)
    policy = Policy("cache_aware", cache.index)
    held = ids_of(template([{"role": "system", "content": SYSTEM}]))
    try:
        pub.publish(blocks(held, 100))

        async def inner(router, session, url):
            await _until(lambda: f"blocks_{urls[1]}" in cache.index.stats())
            decisions = []
            routed = router.policy.routed

            def spy(d, tokens, salt=""):
                decisions.append((d.reason, d.prefill.url if d.prefill is not None else None))
                routed(d, tokens, salt)
            router.policy.routed = spy

            async def ask(body):
                async with session.post(url + "/v1/chat/completions", json=body) as r:
                    assert r.status == 200, await r.text()
                return decisions[-1]
            return await fn(ask, urls[:2], pres, cache)
        return await with_router(urls[:2], urls[2:], inner, policy=policy, cache=cache)
    finally:
        pub.close()
        for w in pres + decs:
            await w.stop()


@pytest.mark.timeout(120)
def test_a_chat_prompt_gets_the_cache_credit_of_the_workers_template():
    async def fn(ask, pre, pres, cache):
        assert await ask(_chat("What is a KV cache?")) == ("pd", pre[1])  # worker 1 holds the system prompt
        asked = pres[0].tokenize_bodies  # the first worker in service was asked, with the chat's own fields
        assert asked == [{"model": "m", "messages": _chat("What is a KV cache?")["messages"]}]
        await ask(_chat("What is a KV cache?"))  # the same prompt again: from the cache, no second question
        assert len(pres[0].tokenize_bodies) == 1
        assert cache.prompts.counts["worker"] == 1 and cache.prompts.counts["cached"] == 1
        assert cache.prompts.counts["local"] == 0
    asyncio.run(_run(True, fn))


@pytest.mark.timeout(120)
def test_negative_control_the_local_template_misses_those_blocks():
    """The same workers without /tokenize: the router's own chat template names other blocks, so no worker
    gets credit (the tie goes to worker 0); each worker's 404 is remembered, so it is asked only once."""
    async def fn(ask, pre, pres, cache):
        assert await ask(_chat("Question 0?")) == ("pd", pre[0])
        for i in range(1, 5):
            assert (await ask(_chat(f"Question {i}?")))[1] != pre[1]
        assert cache.prompts.counts["local"] == 5 and cache.prompts.counts["worker"] == 0
        # one worker asked per request, each once: the fifth request asks no one
        assert len(cache.prompts._lacking) == 4 and set(pre) <= set(cache.prompts._lacking)
    asyncio.run(_run(False, fn))


@pytest.mark.timeout(120)
def test_a_late_answer_does_not_hold_the_request_and_serves_the_next():
    async def fn(ask, pre, pres, cache):
        gate = asyncio.Event()
        pres[0].gate = gate
        # past the deadline: routed with the local tokenization (no credit)
        assert await ask(_chat("late")) == ("pd", pre[0]) and cache.prompts.counts["local"] == 1
        gate.set()  # the answer arrives after the request was routed: it fills the cache
        await _until(lambda: not cache.prompts._pending)
        assert await ask(_chat("late")) == ("pd", pre[1]) and cache.prompts.counts["cached"] == 1
        assert len(pres[0].tokenize_bodies) == 1
    asyncio.run(_run(True, fn, deadline_s=0.2))


def test_token_ids_and_unreadable_prompts_ask_no_one():
    async def main():
        p = PromptTokens(ByteTokenizer(1 << 31))
        assert await p.tokens("/v1/completions", {"prompt": [5, 6, 7]}) == [5, 6, 7]
        assert await p.tokens("/v1/completions", {"prompt": [[5, 6]]}) == [5, 6]
        assert await p.tokens("/v1/completions", {"prompt": "ab"}) == [97, 98]
        assert await p.tokens("/v1/completions", {"prompt": 3}) is None
        assert await p.tokens("/v1/chat/completions", {"messages": "hi"}) is None
        assert await p.tokens("/v1/chat/completions", {"messages": [{"role": "user"}]}) is None  # no content
        msgs = [{"role": "user", "content": "hi"}]
        assert await p.tokens("/v1/chat/completions", {"messages": msgs}) == list(apply_chat_template(msgs).encode())
        assert p.counts == {"given": 2, "cached": 0, "worker": 0, "local": 3, "unreadable": 2}
    asyncio.run(main())


def test_the_cache_is_bounded_in_entries_and_tokens():
    p = PromptTokens(ByteTokenizer(256), max_entries=3, max_tokens=10)
    for i in range(4):
        p._put(bytes([i]), [i] * 2)
    assert list(p._cache) == [bytes([1]), bytes([2]), bytes([3])]  # the least recently used went first
    p._put(b"big", [0] * 6)  # 4 entries and 12 tokens, over both bounds: the oldest go until it fits
    assert list(p._cache) == [bytes([2]), bytes([3]), b"big"] and p._cached_tokens == 10
    p._put(b"huge", [0] * 11)  # larger than the whole cache: not kept
    assert b"huge" not in p._cache
    with pytest.raises(ValueError, match="max_entries 0"):
        PromptTokens(ByteTokenizer(256), max_entries=0)
