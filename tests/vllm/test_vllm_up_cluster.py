"""`kvrelay up -f cluster.yaml` with ``engine: vllm`` and keys, on one host (127.0.0.1): the vLLM servers of the
file listen on the ports it names, answer /v1 only with the key directory's bearer token (which the router
sends), and the router follows their KV events over ipc:// (no CURVE on a unix socket; vLLM's publisher has
none) even though every kvrelay plane is authenticated."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from kvrelay import proc
from kvrelay.httpjson import free_port
from kvrelay.promtext import parse_metrics
from vllm_helpers import prompt, require_vllm
from upcluster import complete_ids as complete, healthy
from waiting import wait_until

pytestmark = pytest.mark.slow  # two vLLM servers (about a minute each to start here)


@pytest.mark.timeout(900)
def test_cluster_file_with_vllm_engines_and_keys(llama_ckpt, tmp_path):
    require_vllm()
    from kvrelay.security import write_keys
    keys = write_keys(tmp_path / "keys")
    token = (keys / "token").read_text().strip()
    ports = {name: free_port() for name in ("store", "prefill", "decode", "router")}
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(f"""
transport: shm
keys: {keys}
engine: vllm
model: {{checkpoint: {llama_ckpt}}}
hosts:
  a:
    address: 127.0.0.1
    store: {{port: {ports['store']}, pool_size: 256MiB, ssd_dir: none}}
    prefill: [{{port: {ports['prefill']}}}]
    decode: [{{port: {ports['decode']}}}]
    router: {{port: {ports['router']}}}
""")
    workdir = tmp_path / "up"
    env = {**os.environ, "KVRELAY_RUNTIME_DIR": str(tmp_path / "run")}
    env.pop("KVRELAY_KEYS", None)
    up_log = tmp_path / "up.log"
    up = proc.spawn_kvrelay(["up", "-f", str(cluster), "--workdir", str(workdir)], name="kvrelay up", log=up_log,
                            env=env, session=True)
    try:
        def serving():
            if up.poll() is not None:
                pytest.fail(f"kvrelay up exited with code {up.returncode}: {up_log.read_text(errors='replace')}")
            return (workdir / "router.ready.json").exists() and healthy(workdir)
        procs = wait_until(serving, 600, "the vLLM cluster of the file serving", interval=0.5)
        assert set(procs) == {"store", "prefill0", "decode0", "router"}
        prefill = f"http://127.0.0.1:{ports['prefill']}"
        router = f"http://127.0.0.1:{ports['router']}"
        assert procs["prefill0"]["address"] == prefill
        model = Path(llama_ckpt).resolve().name

        with pytest.raises(urllib.error.HTTPError) as refused:  # vLLM itself wants the token
            complete(prefill, prompt(40), model, None)
        assert refused.value.code == 401

        tokens = prompt(4 * 32 + 3, seed=21)
        assert complete(prefill, tokens, model, token) is not None  # not through the router: only events tell it

        def learned():
            req = urllib.request.Request(f"{router}/metrics", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=10) as r:
                got = parse_metrics(r.read().decode())
            return got.get(f'kvrelay_router_index_blocks{{source="{prefill}"}}', 0) >= 4 or None
        assert wait_until(learned, 60, "the router's index to learn prefill0's blocks over ipc://", interval=0.2)
        answer = wait_until(lambda: complete(router, prompt(3 * 32 + 5, seed=22), model, token), 120,
                            "an answer through the router", interval=0.5)
        assert len(answer) == 4
    finally:
        up.stop(90)
        out = up_log.read_text(errors="replace")
    assert up.returncode == 0, out
    assert "restarting it in" not in out, out
