"""Dynamo's KV router consumes kvrelay's KV events.  Two colocated `kvrelay dynamo-worker`s, each
subscribed (``--kv-events``) to its own kvrelay `EventPublisher` (vLLM's wire format, kvrelay.events), behind
``python -m dynamo.frontend --router-mode kv`` (the router's own guesses about reuse off).  A prompt whose
blocks were announced (BlockStored) on worker i's publisher is routed to worker i, for each worker in turn:
a router that ignored the events would pick right only by chance (1 in 2 per prompt, 3 prompts).
About 40 s here."""

from __future__ import annotations

import re
import time

import pytest

pytest.importorskip("dynamo.common.backend", reason="NVIDIA Dynamo is not installed (pip install "
                    "ai-dynamo-runtime==1.6.1 && pip install --no-deps ai-dynamo==1.6.1)")
openai = pytest.importorskip("openai", reason="the openai client is not installed")

from kvrelay.engines.dynamo.broker import EventBroker  # noqa: E402
from kvrelay.engines.dynamo.model_dir import add_byte_tokenizer  # noqa: E402
from kvrelay.engines.reference.config import ModelConfig  # noqa: E402
from kvrelay.engines.reference.tokenizer import ByteTokenizer, apply_chat_template  # noqa: E402
from kvrelay.engines.reference.weights import write_random_checkpoint  # noqa: E402
from kvrelay.events.publisher import EventPublisher  # noqa: E402
from kvrelay.events.wire import stored  # noqa: E402

from dynamo_helpers import MODEL, Cluster, chat, free_port  # noqa: E402

BLOCK = 16  # the workers' --block-size: the router hashes announced tokens in blocks of this size


def _worker_id(c: Cluster, name: str) -> int:
    """The Dynamo worker id a worker logs when its KV-event publisher starts."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        m = re.search(r"Initializing KvEventPublisher for worker (\d+)", (c.tmp / f"{name}.log").read_text())
        if m:
            return int(m.group(1))
        time.sleep(0.5)
    raise AssertionError(f"{name} never started its KV-event publisher\n{c.tail()}")


def test_dynamo_kv_router_follows_kvrelay_events(tmp_path):
    ck = add_byte_tokenizer(write_random_checkpoint(tmp_path / "ck", ModelConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2, num_kv_heads=1,
        head_dim=32)))
    disc = tmp_path / "discovery"
    disc.mkdir()
    broker = EventBroker().start()
    pubs = [EventPublisher(replay_endpoint=None).start() for _ in range(2)]
    c = Cluster(tmp_path)
    http = free_port()
    try:
        for i, pub in enumerate(pubs):
            c.spawn(f"w{i}", "dynamo-worker", "--role", "colocated", "--checkpoint", str(ck), "--served-model-name",
                    MODEL, "--discovery-dir", str(disc), "--event-broker", broker.url, "--kv-events", pub.endpoint,
                    "--block-size", str(BLOCK), "--threads", "1")
        c.spawn("frontend", "dynamo-frontend", "--discovery-dir", str(disc), "--event-broker", broker.url,
                "--http-port", str(http), "--", "--router-mode", "kv", "--no-router-assume-kv-reuse")
        ids = [_worker_id(c, "w0"), _worker_id(c, "w1")]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http}/v1", api_key="none", timeout=120, max_retries=0)
        deadline = time.monotonic() + 180
        while not _serving(client, 2, ids):
            assert time.monotonic() < deadline, f"the frontend never served both workers\n{c.tail()}"
            time.sleep(1)
        tok = ByteTokenizer(256)
        for n, target in enumerate((1, 0, 1)):
            msgs = [{"role": "user", "content": f"prompt {n}: " + "abcdefghij"[n] * 400}]
            prompt = tok.encode(apply_chat_template(msgs))
            full = len(prompt) // BLOCK * BLOCK
            hashes = [10_000 * (n + 1) + b for b in range(full // BLOCK)]  # the publisher's own block ids
            pubs[target].publish([stored(hashes, None, prompt[:full], BLOCK, "GPU")])
            time.sleep(2)  # the events cross the worker's subscriber and the event plane to the router
            _, nvext = chat(client, msgs, 2)
            got = (nvext.get("worker_id") or {}).get("decode_worker_id")
            assert got == ids[target], f"prompt {n} announced on w{target} ({ids[target]}) went to {got}\n{c.tail()}"
    finally:
        c.close()
        broker.close()
        for pub in pubs:
            pub.close()


def _serving(client, n: int, ids: list[int]) -> bool:
    """The model is listed and requests have reached ``n`` distinct workers (short prompts, no events)."""
    try:
        if not any(m.id == MODEL for m in client.models.list().data):
            return False
        seen = set()
        for k in range(6):
            _, nvext = chat(client, [{"role": "user", "content": f"hi {k}"}], 1)
            seen.add((nvext.get("worker_id") or {}).get("decode_worker_id"))
        return seen >= set(ids[:n])
    except (openai.APIError, OSError):
        return False
