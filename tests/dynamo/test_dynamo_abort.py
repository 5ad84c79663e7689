"""A Dynamo P/D request whose client disconnects while the decode worker loads its KV from the kvrelay store
releases what it held in the store at once (issue 26): a store, a prefill and a decode `kvrelay
dynamo-worker` (the reference engine in-process, its pulls over tcp: the daemon pins each chunk it copies)
and Dynamo's frontend.  A long streaming chat is sent on a raw socket, which is closed as soon as the store
shows the decode's pull (a pin, or the decode's pulled bytes growing); Dynamo cancels the decode's stream,
the engine aborts the request and its puller hands its pins back.  The store's pins and reserved bytes are
back at their idle values within a second, and the decode worker holds no request and no KV block.  On the
code before issue 26's fix the pins of the pull's last round trips stay until ``pull_pin_ttl`` (30 s).
About 30 s here; skipped where ai-dynamo is not installed.
"""

from __future__ import annotations

import json
import os
import random
import socket

import pytest

pytest.importorskip("dynamo.common.backend", reason="NVIDIA Dynamo is not installed (pip install "
                    "ai-dynamo-runtime==1.6.1 && pip install --no-deps ai-dynamo==1.6.1)")
openai = pytest.importorskip("openai", reason="the openai client is not installed")

from kvrelay.engines.dynamo.broker import EventBroker  # noqa: E402
from kvrelay.store.client import StoreClient  # noqa: E402

from dynamo_helpers import MODEL, Cluster, free_port, metric, pd_checkpoint, spawn_pd, wait_pd  # noqa: E402
from waiting import wait_until  # noqa: E402

pytestmark = pytest.mark.slow  # starts several processes: not in the fast tier (-m 'not slow')
RELEASED_WITHIN_S = 1.0
PROMPT_CHARS = 3000  # byte tokenizer: about as many tokens, 12 chunks of 256 per layer
MAX_TOKENS = 400  # the decode is far from done when the client leaves


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dynamo-abort")
    ck = pd_checkpoint(tmp / "ck", "kvrelay-dynamo-abort")
    disc = tmp / "discovery"
    disc.mkdir()
    broker = EventBroker().start()
    c = Cluster(tmp)
    try:
        store = c.spawn("store", "store", "--port", "0", "--metrics-port", "0", "--pool-size", "256MiB",
                        "--pool-name", f"kvrelay-dynabort-{os.getpid()}", "--ssd-dir", "", "--transports", "shm,tcp",
                        ready_file=tmp / "store.json")
        store_info = store.wait_ready(60)
        ports = {"prefill": free_port(32768), "decode": free_port(32768), "http": free_port()}
        client = spawn_pd(c, ck, disc, broker.url, store_info["address"], ports, "--transport", "tcp")
        wait_pd(c, client, lambda: metric(ports["decode"], "kvrelay_engine_pulled_bytes_total"))
        with StoreClient(store_info["address"], compat_hash="stats-only", name="dynamo-abort-stats") as stats:
            yield {"ports": ports, "stats": stats, "cluster": c}
    finally:
        c.close()
        broker.close()


def _held(stats: StoreClient) -> tuple[int, int]:
    s = stats.stats()
    return s["pins"], s["reserved_bytes"]


def _send_stream(port: int, prompt: str) -> socket.socket:
    """A streaming chat sent on a raw socket (closing it is the client leaving, whatever was answered)."""
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": prompt}], "stream": True,
                       "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def test_client_gone_while_the_decode_loads_releases_its_store_pins(cluster):
    ports, stats, c = cluster["ports"], cluster["stats"], cluster["cluster"]
    dec = ports["decode"]
    idle = (0, 0)  # no request in flight: nothing pinned, nothing reserved (the warm-up's pins gone first)
    wait_until(lambda: _held(stats) == idle, 60, "the store idle after the warm-up", detail=c.tail)
    free0 = metric(dec, "kvrelay_engine_free_blocks")
    pulled0 = metric(dec, "kvrelay_engine_pulled_bytes_total")
    generated0 = metric(dec, "kvrelay_engine_generation_tokens_total")
    rng = random.Random(2626)
    prompt = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(PROMPT_CHARS))

    sock = _send_stream(ports["http"], prompt)
    try:
        # the decode worker's load has started: the daemon pinned a chunk for it, or its pulled bytes grew
        wait_until(lambda: _held(stats)[0] > 0 or metric(dec, "kvrelay_engine_pulled_bytes_total") > pulled0,
                   120, "the decode worker started loading the prompt's KV", detail=c.tail, interval=0.005)
    finally:
        sock.close()  # the client leaves
    wait_until(lambda: _held(stats) == idle, RELEASED_WITHIN_S,
               "store pins and reserved bytes back at their idle values", detail=lambda: f"store: {stats.stats()}")
    wait_until(lambda: metric(dec, "kvrelay_engine_free_blocks") == free0
               and metric(dec, "kvrelay_engine_running") == metric(dec, "kvrelay_engine_waiting") == 0,
               10, "the decode worker let the request go (no request, its blocks free)", detail=c.tail)
    # it was the abort that ended it: the decode stopped far short of max_tokens
    assert metric(dec, "kvrelay_engine_generation_tokens_total") - generated0 < MAX_TOKENS
    assert metric(dec, "kvrelay_engine_pulled_bytes_total") > pulled0, "the decode never loaded from the store"
