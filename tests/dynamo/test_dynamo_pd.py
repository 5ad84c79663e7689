"""kvrelay behind NVIDIA Dynamo: a store, a prefill and a decode `kvrelay dynamo-worker` with file
discovery in a temp dir, ``python -m dynamo.frontend`` on a free 127.0.0.1 port (through `kvrelay
dynamo-frontend`), the official `openai` client.  The greedy output is token-identical to a colocated
`kvrelay engine` on the same checkpoint, another prompt's is not, and the KV crossed the store: the
decode computed none of the prompt and pulled its bytes (its /metrics), the prefill published them.
About 40-60 s here; skipped where ai-dynamo is not installed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.request

import pytest

pytest.importorskip("dynamo.common.backend", reason="NVIDIA Dynamo is not installed (pip install "
                    "ai-dynamo-runtime==1.6.1 && pip install --no-deps ai-dynamo==1.6.1)")
openai = pytest.importorskip("openai", reason="the openai client is not installed")

from kvrelay.engines.dynamo.broker import EventBroker  # noqa: E402

from dynamo_helpers import MAX_TOKENS, Cluster, chat, free_port, metric, pd_checkpoint, spawn_pd, wait_pd  # noqa: E402

pytestmark = pytest.mark.slow  # starts several processes: not in the fast tier (-m 'not slow')
PROMPT_A = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog, then naps in the sun."}]
PROMPT_B = [{"role": "user", "content": "The quick brown cat jumps over the lazy dog, then naps in the sun."}]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dynamo")
    ck = pd_checkpoint(tmp / "ck", "kvrelay-dynamo-test")
    disc = tmp / "discovery"
    disc.mkdir()
    broker = EventBroker().start()
    c = Cluster(tmp)
    try:
        store = c.spawn("store", "store", "--port", "0", "--metrics-port", "0", "--pool-size", "256MiB",
                        "--pool-name", f"kvrelay-dyntest-{os.getpid()}", "--ssd-dir", "",
                        ready_file=tmp / "store.json")
        colo = c.spawn("colocated", "engine", "--role", "colocated", "--checkpoint", str(ck), "--port", "0",
                       "--threads", "1", ready_file=tmp / "colo.json")
        store_info = store.wait_ready(60)
        ports = {"prefill": free_port(32768), "decode": free_port(32768), "http": free_port()}
        client = spawn_pd(c, ck, disc, broker.url, store_info["address"], ports)
        colo_info = colo.wait_ready(120)
        wait_pd(c, client, lambda: metric(ports["decode"], "kvrelay_engine_pulled_bytes_total"))
        yield {"client": client, "ports": ports, "colo": colo_info["url"], "cluster": c}
    finally:
        c.close()
        broker.close()


def colocated(url: str, messages: list[dict]) -> tuple[list[int], int]:
    """(greedy token ids, prompt tokens) of the colocated reference engine (EOS = 0, as in the checkpoint)."""
    body = json.dumps({"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0.0,
                       "stop_token_ids": [0]}).encode()
    req = urllib.request.Request(f"{url}/v1/chat/completions", body, {"Content-Type": "application/json"})
    out = json.loads(urllib.request.urlopen(req, timeout=120).read())
    return out["choices"][0]["token_ids"], out["usage"]["prompt_tokens"]


def test_pd_behind_dynamo_frontend_matches_colocated_and_moves_kv(cluster):
    client, ports = cluster["client"], cluster["ports"]
    pulled0 = metric(ports["decode"], "kvrelay_engine_pulled_bytes_total")
    computed0 = metric(ports["decode"], "kvrelay_engine_prefill_computed_tokens_total")
    published0 = metric(ports["prefill"], "kvrelay_engine_published_bytes_total")

    got_a, nvext = chat(client, PROMPT_A)
    want_a, prompt_len = colocated(cluster["colo"], PROMPT_A)
    assert nvext["prompt_tokens"] == prompt_len, "Dynamo's chat template or tokenizer differs from the engine's"
    assert got_a == want_a, f"Dynamo P/D {got_a} != colocated {want_a}"
    assert len(got_a) >= 4, f"too short to mean anything: {got_a}"
    # the frontend routed it through a prefill worker and a (different) decode worker
    wid = nvext.get("worker_id") or {}
    assert wid.get("prefill_worker_id") and wid.get("decode_worker_id"), nvext
    assert wid["prefill_worker_id"] != wid["decode_worker_id"], nvext

    # the KV moved through kvrelay: published by the prefill, pulled by the decode, which computed none of it
    assert metric(ports["prefill"], "kvrelay_engine_published_bytes_total") > published0
    assert metric(ports["decode"], "kvrelay_engine_pulled_bytes_total") > pulled0
    assert metric(ports["decode"], "kvrelay_engine_prefill_computed_tokens_total") == computed0

    # negative control: one changed word gives another greedy output (the model does read its prompt)
    got_b, _ = chat(client, PROMPT_B)
    assert got_b == colocated(cluster["colo"], PROMPT_B)[0]
    assert got_b != got_a, "a different prompt gave the same output: equality above would prove nothing"


def test_dynamo_event_plane_listens_on_loopback_only(cluster):
    """Nothing a worker or the frontend (or a child of theirs) opened listens beyond 127.0.0.1 (the broker
    keeps ZMQ there).  The ports the test knows they listen on must be among the listeners `ss` attributes
    to them first: where `ss` shows no process (permissions, a grandchild) the check would see nothing."""
    pids = descendants({p.pid for _, p in cluster["cluster"].procs if p.poll() is None})
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    ours = [line for line in out.splitlines() if any(f"pid={pid}," in line for pid in pids)]
    seen = {int(m.group(1)) for line in ours if (m := re.search(r":(\d+)\s", line))}
    known = {cluster["ports"][k] for k in ("http", "prefill", "decode")}  # the frontend's HTTP, the metrics
    assert known <= seen, (f"`ss -ltnp` shows none of the listeners {sorted(known - seen)} as the cluster's "
                           f"processes' (pids {sorted(pids)}): nothing would be checked\n{out}")
    bad = [line for line in ours if not re.search(r"\s127\.0\.0\.1:\d+\s", line)]
    assert not bad, "listeners beyond loopback:\n" + "\n".join(bad)


def descendants(pids: set[int]) -> set[int]:
    """``pids`` and every process below them (from /proc: Dynamo's workers may start children)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            parent[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, grew = set(pids), True
    while grew:
        more = {pid for pid, pp in parent.items() if pp in out} - out
        out |= more
        grew = bool(more)
    return out
