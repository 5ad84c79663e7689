"""`kvrelay up --engine vllm`: its vLLM servers are supervised like kvrelay's own processes and publish vLLM's
own KV events, which the router follows.

One cluster (store, a prefill and a decode vLLM server with the kvrelay connector, the router), checked for:
- `kvrelay status` shows both servers running and healthy;
- the router's KV index learns a vLLM server's blocks from vLLM's events: a prompt sent to the prefill
  server directly (not through the router, so only the events can tell the router about it) shows up in
  ``kvrelay_router_index_blocks`` for that server, one entry per whole 32-token block;
- the decode server killed with -9 (its API server only: vLLM's EngineCore would be left behind) is
  restarted on its port, nothing of its old process group is left, and the router serves through it again;
- stopping `kvrelay up` leaves no process of any server's group behind.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from kvrelay import proc
from kvrelay.promtext import scrape
from vllm_helpers import prompt, require_vllm
from upcluster import complete_ids as complete, healthy
from waiting import wait_until

pytestmark = pytest.mark.slow  # two vLLM servers (about a minute each to start here)

BLOCK = 32


def index_blocks(router: str, source: str) -> int:
    metrics = scrape(f"{router}/metrics", timeout=10.0)
    return int(metrics.get(f'kvrelay_router_index_blocks{{source="{source}"}}', 0))


@pytest.mark.timeout(900)
def test_up_vllm_supervised_with_kv_events(llama_ckpt, tmp_path):
    require_vllm()
    workdir, env = tmp_path / "up", {**os.environ, "KVRELAY_RUNTIME_DIR": str(tmp_path / "run")}
    up_log = tmp_path / "up.log"
    up = proc.spawn_kvrelay(["up", "--engine", "vllm", "--checkpoint", str(llama_ckpt), "--port", "0",
                             "--pool-size", "256MiB", "--ssd-dir", "none", "--workdir", str(workdir)],
                            name="kvrelay up", log=up_log, env=env, session=True)
    groups: list[int] = []
    t0 = time.monotonic()
    try:
        def serving():
            if up.poll() is not None:
                pytest.fail(f"kvrelay up exited with code {up.returncode}: {up_log.read_text(errors='replace')}")
            return (workdir / "router.ready.json").exists() and healthy(workdir)
        procs = wait_until(serving, 600, "the vLLM cluster serving", interval=0.5)
        print(f"kvrelay up --engine vllm serving: {time.monotonic() - t0:.1f}s")
        assert set(procs) == {"store", "prefill0", "decode0", "router"}
        assert procs["decode0"]["supervised"] and procs["decode0"]["health_url"].endswith("/health")
        router, prefill, decode = (procs[n]["address"] for n in ("router", "prefill0", "decode0"))
        groups += [procs["prefill0"]["pid"], procs["decode0"]["pid"]]
        model = Path(llama_ckpt).resolve().name

        # vLLM's KV events reach the router's index: a prompt the router never saw, sent to prefill0 directly
        tokens = prompt(5 * BLOCK + 7, seed=11)
        before = index_blocks(router, prefill)
        assert complete(prefill, tokens, model) is not None
        t1 = time.monotonic()
        learned = wait_until(lambda: index_blocks(router, prefill) >= before + 5 or None, 60,
                             "the router's index to learn prefill0's blocks from vLLM's KV events", interval=0.2)
        assert learned
        print(f"answer from prefill0 -> the router's index holds its blocks: {time.monotonic() - t1:.2f}s")

        answer = wait_until(lambda: complete(router, prompt(3 * BLOCK + 5, seed=12), model), 120,
                            "an answer through the router", interval=0.5)

        # the decode server's API server killed with -9: restarted on its port, its old group gone
        old = procs["decode0"]["pid"]
        assert proc.group_alive(old)
        os.kill(old, signal.SIGKILL)
        t2 = time.monotonic()
        procs = wait_until(lambda: healthy(workdir, decode0=1), 600, "decode0 restarted", interval=0.5)
        assert procs["decode0"]["address"] == decode and procs["decode0"]["pid"] != old
        assert procs["decode0"]["last_exit"] == -signal.SIGKILL
        assert not proc.group_alive(old), "the killed vLLM server's EngineCore/Worker were left running"
        groups.append(procs["decode0"]["pid"])
        again = wait_until(lambda: complete(router, prompt(3 * BLOCK + 5, seed=12), model), 120,
                           "an answer through the restarted decode0", interval=0.5)
        assert len(again) == len(answer) == 4
        print(f"decode0 kill -9 -> restarted, healthy and answering through the router: {time.monotonic() - t2:.1f}s")
    finally:
        up.stop(90)
        out = up_log.read_text(errors="replace")
    assert up.returncode == 0, out
    assert out.count("restarting it in") == 1, out  # stopping `kvrelay up` is not a crash
    left = [g for g in groups if proc.group_alive(g)]
    assert left == [], f"vLLM process groups {left} outlived `kvrelay up`"
