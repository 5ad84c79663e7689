"""Through the router (a store, a prefill and a decode reference engine): the same cache_salt hits, another
tenant's probe of the same prompt misses -- in the prefill engine's prefix cache and in the store -- and
does the work of a cold miss, with the same tokens out."""

from __future__ import annotations

import json
import re
import urllib.request
import uuid
from pathlib import Path

import pytest

from kvrelay import proc
from kvrelay.store.client import StoreClient
from kvrelay.store.pool import unlink_pool
from store_helpers import Daemon

pytestmark = pytest.mark.slow  # starts several processes: not in the fast tier (-m 'not slow')

PROMPT = [(i * 7919) % 31000 + 300 for i in range(80)]


def _start(tmp: Path, args: list[str], procs: list[proc.ChildProcess]) -> str:
    child = proc.spawn_kvrelay([*args, "--port", "0", "--log-level", "WARNING"], name=args[0],
                               log=tmp / f"{args[0]}-{len(procs)}.log", log_mode="ab",
                               ready_file=tmp / f"ready-{uuid.uuid4().hex[:6]}.json")
    procs.append(child)
    return child.wait_ready(120)["url"]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _hit_tokens(url: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    m = re.search(r"^kvrelay_engine_prefix_cache_hit_tokens_total (\S+)$", text, re.M)
    assert m, "the engine exports kvrelay_engine_prefix_cache_hit_tokens_total"
    return float(m.group(1))


@pytest.mark.timeout(300)
def test_same_salt_hits_other_salt_misses_through_the_router(tmp_path):
    store = Daemon(tmp_path, pool_size="256MiB").start()
    procs: list[proc.ChildProcess] = []
    try:
        eng = ["--store", store.address, "--num-layers", "2", "--block-size", "16", "--chunk-tokens", "16",
               "--num-blocks", "256", "--threads", "1"]
        prefill = _start(tmp_path, ["engine", "--role", "prefill", *eng], procs)
        decode = _start(tmp_path, ["engine", "--role", "decode", *eng], procs)
        router = _start(tmp_path, ["router", "--prefill", prefill, "--decode", decode, "--store", store.address],
                        procs)
        with StoreClient(store.address, compat_hash="tenants-test") as c:
            def tenant(name: str) -> dict:
                return c.stats()["tenants"].get(name, {})

            body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
            cold = _post(router, {**body, "cache_salt": "alice"})
            cold_in = tenant("alice")["committed_bytes"]
            assert cold_in > 0
            h0 = _hit_tokens(prefill)
            again = _post(router, {**body, "cache_salt": "alice"})  # same salt: a hit
            h1 = _hit_tokens(prefill)
            # nothing published twice: only the request's 8-byte first token (keyed by request id, not content)
            assert h1 - h0 >= 64 and tenant("alice")["committed_bytes"] == cold_in + 8
            probe = _post(router, {**body, "cache_salt": "mallory"})  # another tenant, the same prompt: a miss
            assert _hit_tokens(prefill) == h1  # no prefix-cache hit in the prefill engine
            assert tenant("mallory")["committed_bytes"] == cold_in  # the whole prompt computed and published
            assert tenant("alice")["committed_bytes"] == cold_in + 8
            assert cold["choices"][0]["token_ids"] == again["choices"][0]["token_ids"] == \
                probe["choices"][0]["token_ids"]
    finally:
        proc.stop_all(procs, grace=20)
        store.cleanup()
        unlink_pool(store.pool_name)
