"""`kvrelay up -f` with vLLM engines and a store on every host (issue 23), the hosts on loopback: host a runs a
store and a vLLM prefill, host b a store, a vLLM decode and the router, over tcp.  A request through the router
is loaded by the decode from a's store (the router named it in the decode leg's params): a's store served the
pulls, b's own store none, and the decode counted the load, none failed."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest

from kvrelay import proc
from kvrelay.promtext import parse_metrics, sum_samples
from ports import free_port_pairs, free_ports
from upcluster import complete_ids as complete, healthy, processes
from vllm_helpers import prompt, require_vllm
from waiting import wait_until

pytestmark = pytest.mark.slow  # two vLLM servers (about a minute each to start here)


def _metric(url: str, name: str) -> float:
    """The sum of ``name``'s samples at ``url`` (vLLM labels its counters with the model and engine)."""
    import urllib.request
    with urllib.request.urlopen(url, timeout=10) as r:
        return sum_samples(parse_metrics(r.read().decode()), name)


@pytest.mark.timeout(900)
def test_a_vllm_decode_loads_from_its_prefills_store(llama_ckpt, tmp_path):
    require_vllm()
    names = ("sa", "sb", "prefill", "decode", "router")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    ports["ea"], ports["eb"] = free_port_pairs(2, list(ports.values()))  # each store's KV events and replay socket
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(f"""
transport: tcp
engine: vllm
model: {{checkpoint: {llama_ckpt}}}
hosts:
  a: {{address: 127.0.0.1, store: {{port: {ports['sa']}, events_port: {ports['ea']}, pool_size: 256MiB, ssd_dir: none}},
      prefill: [{{port: {ports['prefill']}}}]}}
  b: {{address: 127.0.0.1, store: {{port: {ports['sb']}, events_port: {ports['eb']}, pool_size: 256MiB, ssd_dir: none}},
      decode: [{{port: {ports['decode']}}}], router: {{port: {ports['router']}}}}}
""")
    env = {**os.environ, "KVRELAY_RUNTIME_DIR": str(tmp_path / "run")}
    env.pop("KVRELAY_KEYS", None)
    ups = {}
    try:
        for host in ("a", "b"):
            ups[host] = proc.spawn_kvrelay(["up", "-f", str(cluster), "--host", host, "--workdir",
                                            str(tmp_path / host)], name=f"kvrelay up {host}",
                                           log=tmp_path / f"{host}.log", env=env, session=True)

        def serving():
            for host, up in ups.items():
                if up.poll() is not None:
                    pytest.fail(f"kvrelay up {host} exited with code {up.returncode}: "
                                f"{(tmp_path / f'{host}.log').read_text(errors='replace')}")
            return (tmp_path / "b" / "router.ready.json").exists() and healthy(tmp_path / "a") and \
                healthy(tmp_path / "b")
        wait_until(serving, 600, "the two vLLM hosts serving", interval=0.5)
        model = Path(llama_ckpt).resolve().name
        router = f"http://127.0.0.1:{ports['router']}"
        prefill_url = f"http://127.0.0.1:{ports['prefill']}"

        def prefill_in_service() -> bool:  # else the router sends the first request to the decode alone
            try:
                with urllib.request.urlopen(f"{router}/readyz", timeout=5) as r:
                    return prefill_url in json.loads(r.read())["prefill"]
            except (OSError, ValueError, KeyError):
                return False
        wait_until(prefill_in_service, 120, "the router to count the prefill healthy", interval=0.5)
        decode = f"http://127.0.0.1:{ports['decode']}/metrics"

        def settled_loads() -> float:
            return _metric(decode, "kvrelay:loads_ok_total") + _metric(decode, "kvrelay:loads_failed_total")
        # the first request after start-up loads too: with both hosts' vLLM workers pinned to one core (both
        # hosts planned core 0), a prefill's step waited here until the spinning decode's pull gave up (30 s)
        assert len(wait_until(lambda: complete(router, prompt(3 * 32 + 5, seed=22), model), 120,
                              "a first answer through the router", interval=0.5)) == 4
        wait_until(lambda: settled_loads() >= 1, 120, "the decode's first load settled", interval=0.5)
        ok0, failed0 = _metric(decode, "kvrelay:loads_ok_total"), _metric(decode, "kvrelay:loads_failed_total")
        assert (ok0, failed0) == (1, 0), "the first request's load failed (the decode recomputed it)"
        answer = complete(router, prompt(5 * 32 + 7, seed=23), model)
        assert len(answer) == 4

        def store(host: str) -> str:
            return processes(tmp_path / host)["store"]["health_url"].rsplit("/", 1)[0] + "/metrics"
        wait_until(lambda: _metric(decode, "kvrelay:loads_ok_total") >= ok0 + 1, 60, "the decode's load counted",
                   interval=0.5)
        assert _metric(decode, "kvrelay:loads_failed_total") == failed0
        assert _metric(decode, "kvrelay:pulled_bytes_total") > 0
        assert _metric(store("a"), "kvrelay_store_pulls_total") > 0, "the decode did not pull from a's store"
        # (b's store may hold the decode server's own start-up request: vLLM's kv_both publishes what it computes)
        assert _metric(store("b"), "kvrelay_store_pulls_total") == 0, "the decode pulled from its own store"
    finally:
        for up in ups.values():
            up.stop(90)
    for host in ("a", "b"):
        out = (tmp_path / f"{host}.log").read_text(errors="replace")
        assert "Traceback" not in out and "restarting it in" not in out, out[-3000:]
