"""`kvrelay up -f cluster.yaml` with `etcd:` on a real etcd: the file runs a store, a prefill and the router
and no decode at all; a decode engine started on its own with `kvrelay engine --etcd` joins the router within
a few seconds and serves (token-identical to a colocated engine), `kvrelay status --etcd` lists the whole
cluster, and the decode killed (SIGKILL) leaves the router within its lease."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request

import pytest
import yaml
from upcluster import complete_ids
from waiting import wait_until

from kvrelay import proc, status
from kvrelay.httpjson import free_port

MODEL = "kvrelay-ref-8l-512-v32000-seed0"
PROMPT = list(range(7, 100))


def readyz(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, {}


@pytest.mark.slow  # etcd, kvrelay up (store, prefill, router) and two engines
@pytest.mark.timeout(400)
def test_up_with_etcd_takes_a_decode_that_joins_at_run_time(etcd, tmp_path):
    store_port, prefill_port, router_port = free_port(), free_port(), free_port()
    spec = {"transport": "shm", "etcd": etcd.url, "hosts": {"a": {
        "address": "127.0.0.1", "store": {"port": store_port, "pool_size": "128MiB"},
        "prefill": [{"port": prefill_port, "threads": 1}], "router": {"port": router_port}}}}
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if k != "KVRELAY_KEYS"}
    router = f"http://127.0.0.1:{router_port}"
    procs = [proc.spawn_kvrelay(["up", "-f", str(tmp_path / "cluster.yaml"), "--workdir", str(tmp_path / "up")],
                                name="kvrelay up", log=tmp_path / "up.log", env=env)]
    try:
        colocated = proc.spawn_kvrelay(["engine", "--role", "colocated", "--port", "0", "--threads", "1"],
                                       name="colocated", log=tmp_path / "colocated.log",
                                       ready_file=tmp_path / "colocated.json", env=env)
        procs.append(colocated)
        wait_until(lambda: readyz(router)[1].get("prefill") == [f"http://127.0.0.1:{prefill_port}"], 300,
                   "the router up with the file's prefill (from etcd)", detail=lambda: (tmp_path / "up.log").read_text())
        assert readyz(router)[0] == 503  # no decode yet: the file has none
        decode = proc.spawn_kvrelay(["engine", "--role", "decode", "--store", f"tcp://127.0.0.1:{store_port}",
                                     "--port", "0", "--threads", "1", "--etcd", etcd.url, "--name", "late-decode"],
                                    name="late decode", log=tmp_path / "decode.log",
                                    ready_file=tmp_path / "decode.json", env=env)
        procs.append(decode)
        decode_url = decode.wait_ready(300)["url"]
        t0 = time.monotonic()
        wait_until(lambda: readyz(router)[1].get("decode") == [decode_url], 5, "the late decode in the router")
        print(f"the late decode was in the router {time.monotonic() - t0:.2f}s after its ready file")
        expected = complete_ids(colocated.wait_ready(300)["url"], PROMPT, MODEL)
        assert complete_ids(router, PROMPT, MODEL) == expected
        names = {(m["kind"], m["name"]) for m in status.etcd_members(etcd.url, "default", 2.0)}
        assert {("store", "a-store"), ("prefill", "a-prefill0"), ("decode", "late-decode")} <= names
        assert any(kind == "router" for kind, _ in names), names
        decode.signal(signal.SIGKILL)
        t_kill = time.monotonic()
        # out of service at once (its breaker: a refused probe); out of the pool when its lease of 5 s expires
        wait_until(lambda: [b["url"] for b in readyz(router)[1]["breakers"]["decode"]] == [], 5 + 3,
                   "the killed decode dropped from the router's pool")
        print(f"dropped {time.monotonic() - t_kill:.2f}s after SIGKILL")
    finally:
        procs[0].stop(60)
        proc.stop_all(procs[1:])
