"""A store on every host, run by `kvrelay up -f` (issue 23), with the hosts on loopback: two prefill hosts
and a decode host (with the router), each with its own store, over tcp.  Greedy output is token-identical
to a colocated engine's (and another prompt gives other tokens); the decode pulled every request's KV
straight from its prefill's store and never recomputed, and its own store saw none of it (no second hop).
When one prefill host's store is killed, the router passes that prefill over (its requests go to the other
host, exact, nothing hangs) until `kvrelay up` has restarted the store, then uses it again.

The namespace version with bytes per veth link is tests/multihost/test_store_per_host.py (when present).
"""

from __future__ import annotations

import json
import os
import random
import signal
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from upcluster import processes
from waiting import wait_until

from kvrelay import proc
from ports import free_port_pairs, free_ports

pytestmark = pytest.mark.slow
MODEL = "kvrelay-ref-8l-512-v32000-seed0"  # the seeded random reference model every engine serves
HOSTS = ("p1", "p2", "d")
START_S = 300.0


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def _metric(url: str, name: str) -> float:
    code, text = _get(url)
    assert code == 200, text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def _complete(url: str, prompt: list[int]) -> tuple[list[int], dict]:
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0.0,
                       "return_token_ids": True, "ignore_eos": True}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        out = json.loads(r.read())
    return out["choices"][0]["token_ids"], out.get("kvrelay") or {}


@pytest.fixture(scope="module")
def colocated(tmp_path_factory):
    d = tmp_path_factory.mktemp("colocated")
    env = {k: v for k, v in os.environ.items() if k != "KVRELAY_KEYS"}
    engine = proc.spawn_kvrelay(["engine", "--role", "colocated", "--port", "0"], name="colocated engine",
                                log=d / "log", ready_file=d / "ready.json", env=env)
    try:
        yield engine.wait_ready(START_S)["url"]
    finally:
        engine.stop(30)


@pytest.mark.timeout(600)
def test_store_per_host_pulls_from_the_owner_and_survives_a_dead_store(colocated, tmp_path):
    s1, s2, s3, e1, e2, e3, r = free_ports(7)
    ev = free_port_pairs(3, [s1, s2, s3, e1, e2, e3, r])  # each store's KV events and their replay socket (the router follows them)
    spec = {"transport": "tcp", "hosts": {
        "p1": {"address": "127.0.0.1", "store": {"port": s1, "pool_size": "128MiB", "events_port": ev[0]},
               "prefill": [{"port": e1}]},
        "p2": {"address": "127.0.0.1", "store": {"port": s2, "pool_size": "128MiB", "events_port": ev[1]},
               "prefill": [{"port": e2}]},
        "d": {"address": "127.0.0.1", "store": {"port": s3, "pool_size": "128MiB", "events_port": ev[2]},
              "decode": [{"port": e3}], "router": {"port": r}}}}
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if k != "KVRELAY_KEYS"}
    ups: list[proc.ChildProcess] = []
    router = f"http://127.0.0.1:{r}"
    try:
        for host in HOSTS:
            (tmp_path / host).mkdir()
            ups.append(proc.spawn_kvrelay(["up", "-f", str(cluster), "--host", host, "--workdir",
                                           str(tmp_path / host)], name=f"kvrelay up {host}",
                                          log=tmp_path / host / "up.log", env=env))
        last = {"body": ""}

        def ready() -> bool:
            dead = [p.argv for p in ups if p.poll() is not None]
            if dead:
                pytest.fail(f"kvrelay up exited: {dead}\n" + "\n".join(
                    f"--- {f}\n{f.read_text()[-2000:]}" for f in sorted(tmp_path.rglob("*.log"))))
            code, last["body"] = _get(f"{router}/readyz")
            if code != 200:
                return False
            body = json.loads(last["body"])
            return len(body["prefill"]) == 2 and bool(body["decode"]) and \
                [s["up"] for s in body.get("stores") or []] == [True, True]
        wait_until(ready, START_S, "the router ready with two prefills, a decode and both prefill stores",
                   detail=lambda: last["body"], interval=0.2)

        def store_metrics(host: str) -> str:
            return processes(tmp_path / host)["store"]["health_url"].rsplit("/", 1)[0] + "/metrics"

        def engine_metrics(port: int) -> str:
            return f"http://127.0.0.1:{port}/metrics"

        rng = random.Random(23)
        prompts = [[rng.randrange(3, 32000) for _ in range(300)] for _ in range(4)]
        with ThreadPoolExecutor(len(prompts)) as pool:  # at once: least_loaded spreads them over both prefills
            answers = list(pool.map(lambda p: _complete(router, p), prompts))
        for prompt, (pd, info) in zip(prompts, answers, strict=True):
            ref, _ = _complete(colocated, prompt)
            assert pd == ref, "P/D with a store per host differs from the colocated engine"
            assert not info.get("recomputed"), f"the decode recomputed instead of pulling: {info}"
        other, _ = _complete(colocated, [prompts[0][0] + 1, *prompts[0][1:]])
        assert other != _complete(colocated, prompts[0])[0], "negative control: one changed token changed nothing"
        published = {h: _metric(engine_metrics(e), "kvrelay_engine_published_bytes_total")
                     for h, e in (("p1", e1), ("p2", e2))}
        assert all(published.values()), f"least_loaded used only one prefill host: {published}"
        pulled = _metric(engine_metrics(e3), "kvrelay_engine_pulled_bytes_total")
        assert pulled == sum(published.values()), (pulled, published)
        for host in ("p1", "p2"):  # each prefill's KV went into its own host's store, and was pulled from there
            assert _metric(store_metrics(host), "kvrelay_store_commits_total") > 0
            assert _metric(store_metrics(host), "kvrelay_store_pulls_total") > 0
        for name in ("kvrelay_store_commits_total", "kvrelay_store_pulls_total"):  # no second hop via the decode's
            assert _metric(store_metrics("d"), name) == 0, name

        # a decode leg naming a store that is not one of the cluster's is refused, naming it
        body = json.dumps({"model": MODEL, "prompt": prompts[0], "max_tokens": 2, "request_id": "stray",
                           "kv_transfer_params": {"do_remote_prefill": True,
                                                  "store_address": "tcp://127.0.0.1:1"}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{e3}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=30)
        assert refused.value.code == 400 and "tcp://127.0.0.1:1" in refused.value.read().decode()

        # host p1's store dies: only p2 serves prefills until `kvrelay up` restarted it
        def p1_up() -> bool:  # the router lists the stores by address, not in the file's order
            stores = json.loads(_get(f"{router}/readyz")[1])["stores"]
            return next(s["up"] for s in stores if s["address"] == f"tcp://127.0.0.1:{s1}")
        store = processes(tmp_path / "p1")["store"]
        os.kill(store["pid"], signal.SIGKILL)
        wait_until(lambda: not p1_up(), 10,
                   "the router to see p1's store down")
        before = _metric(engine_metrics(e1), "kvrelay_engine_published_bytes_total")
        fresh = [[rng.randrange(3, 32000) for _ in range(200)] for _ in range(2)]
        for prompt in fresh:
            pd, info = _complete(router, prompt)
            assert pd == _complete(colocated, prompt)[0] and not info.get("recomputed"), info
        assert _metric(engine_metrics(e1), "kvrelay_engine_published_bytes_total") == before, \
            "a prefill whose store was down got requests"
        wait_until(lambda: processes(tmp_path / "p1")["store"]["restarts"] == 1 and
                   p1_up(), 120,
                   "p1's store restarted and seen up by the router")
        more = [[rng.randrange(3, 32000) for _ in range(200)] for _ in range(4)]
        for prompt in more:
            pd, info = _complete(router, prompt)
            assert pd == _complete(colocated, prompt)[0] and not info.get("recomputed"), info
        assert _metric(engine_metrics(e1), "kvrelay_engine_published_bytes_total") > before, \
            "p1 was not used again once its store was back"
    finally:
        for p in ups:
            p.signal(signal.SIGTERM)
        for p in ups:
            p.stop(30)
    for host in HOSTS:
        assert "Traceback" not in (tmp_path / host / "up.log").read_text(), host
