"""Dynamo's KV router consumes kvrelay's KV events.  Two colocated `kvrelay dynamo-worker`s, each
subscribed (``--kv-events``) to its own kvrelay `EventPublisher` (vLLM's wire format, kvrelay.events), behind
``python -m dynamo.frontend --router-mode kv`` (the router's own guesses about reuse off).  A prompt whose
blocks were announced (BlockStored) on worker i's publisher is routed to worker i, for each worker in turn:
a router that ignored the events would pick right only by chance (1 in 2 per prompt, 3 prompts).
The events cross the worker's subscriber and the event plane to the router: the routing is judged on the
first answer for which the router predicted a KV hit on the whole announced prefix
(``nvext.timing.kv_hit_rate``, which only the announcement can cause), not after a fixed pause (that made
the test flaky, with prompt 2's announcement not applied the block every prompt shares was a tie).  About 40 s here."""

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
from kvrelay.tokenizer import ByteTokenizer, apply_chat_template  # noqa: E402
from kvrelay.engines.reference.weights import write_random_checkpoint  # noqa: E402
from kvrelay.events.publisher import EventPublisher  # noqa: E402
from kvrelay.events.wire import stored  # noqa: E402
from kvrelay.keys import block_hashes  # noqa: E402

from dynamo_helpers import MODEL, Cluster, chat, free_port  # noqa: E402
from waiting import Deadline, wait_until  # noqa: E402

pytestmark = pytest.mark.slow  # starts several processes: not in the fast tier (-m 'not slow')

BLOCK = 16  # the workers' --block-size: the router hashes announced tokens in blocks of this size
RESEND_S = 10.0  # an announcement not seen by then is published again


def _worker_id(c: Cluster, name: str) -> int:
    """The Dynamo worker id a worker logs when its KV-event publisher starts."""
    m = wait_until(lambda: re.search(r"Initializing KvEventPublisher for worker (\d+)",
                                     (c.tmp / f"{name}.log").read_text()),
                   180, f"{name} starting its KV-event publisher", detail=c.tail, interval=0.2)
    return int(m.group(1))


def _route_announced(c: Cluster, client, pub: EventPublisher, event, msgs: list[dict],
                     min_rate: float) -> tuple[int | None, float]:
    """Publish ``event``, then send ``msgs`` until the router predicts a KV hit of at least ``min_rate`` for
    them (the announcement has reached its index); return (the decode worker it chose then, the predicted hit
    rate).  Without the events no request is ever predicted that (the workers announce nothing else and the
    router assumes no reuse), so the deadline fails a router that ignores them.  Published again every
    RESEND_S: ZMQ drops what a subscriber missed before it connected; a second copy of a stored block is
    harmless."""
    d = Deadline(120, f"the router predicting a KV hit rate of {min_rate:.2f} for the announced prompt")
    while True:
        pub.publish([event])
        resend = time.monotonic() + RESEND_S
        while time.monotonic() < resend:
            _, nvext = chat(client, msgs, 2)
            worker = (nvext.get("worker_id") or {}).get("decode_worker_id")
            rate = float((nvext.get("timing") or {}).get("kv_hit_rate") or 0.0)
            if rate >= min_rate:
                return worker, rate
            d.check(f"last answer: worker {worker}, kv_hit_rate {rate}\n{c.tail()}")
            d.pause()


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
        wait_until(lambda: _serving(client, 2, ids), 180, "the frontend serving both workers", detail=c.tail,
                   interval=0.2)
        tok = ByteTokenizer(256)
        for n, target in enumerate((1, 0, 1)):
            msgs = [{"role": "user", "content": f"prompt {n}: " + "abcdefghij"[n] * 400}]
            prompt = tok.encode(apply_chat_template(msgs))
            full = len(prompt) // BLOCK * BLOCK
            # content-derived block ids, as an engine's prefix cache has them: the chat template's first block,
            # the same in every prompt, keeps its id (with ids of its own per prompt, a worker that already
            # held that block got a second id for it and the router matched only that one block)
            hashes = [int(h[:15], 16) for h in block_hashes(prompt[:full], BLOCK, MODEL, "kv-events-test")]
            # every prompt starts with the chat template's first block, announced with the earlier prompts on
            # both workers: only a hit on the whole announced prefix shows that this announcement arrived
            min_rate = (full // BLOCK - 0.5) / -(-len(prompt) // BLOCK)
            got, rate = _route_announced(c, client, pubs[target], stored(hashes, None, prompt[:full], BLOCK, "GPU"),
                                         msgs, min_rate)
            assert got == ids[target], (f"prompt {n} announced on w{target} ({ids[target]}) went to {got} "
                                        f"(predicted hit rate {rate})\n{c.tail()}")
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
