"""Prefix reuse across hosts, run by `kvrelay up -f` alone (issue 23): with a store on every host, `kvrelay up`
starts each store with its KV events and gives the router every store's, so no flag is given by hand.  Hosts
on loopback: "p" runs a store and a prefill engine, "d" a store, a decode engine with ``keep_remote_prefix:
true`` and the router.  A prefix computed by p's prefill lands in p's store; the router learns it from p's
store's events and sends a longer prompt on that prefix to the decode alone with p's store as the hint
(route ``store_holds_prefix``): the decode loads the prefix's whole chunks from p's store (``store="other"``)
and computes the rest, token-identical to a colocated engine.  It kept a copy in its own store, whose
events the router follows too.

The namespace version (hand-given flags, bytes per link) is tests/multihost/test_prefix_across_hosts.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
import urllib.request

import pytest
import yaml
from waiting import wait_until

from kvrelay import proc
from ports import free_port_pairs

pytestmark = pytest.mark.slow
MODEL = "kvrelay-ref-8l-512-v32000-seed0"  # the seeded random reference model every engine serves
START_S = 300.0
PREFIX, SUFFIX = 1100, 60  # a 1,024-token prefix is loaded (four 256-token chunks), the rest computed


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def _metric(url: str, name: str) -> float:
    code, text = _get(f"{url}/metrics")
    assert code == 200, text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def _complete(url: str, prompt: list[int], max_tokens: int = 8) -> list[int]:
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                       "return_token_ids": True, "ignore_eos": True}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.loads(r.read())["choices"][0]["token_ids"]
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{url}: HTTP {exc.code}: {exc.read()[:500]!r}") from None


@pytest.mark.timeout(600)
def test_up_follows_every_stores_events_and_the_router_hints_a_prefix_across_hosts(tmp_path):
    sp, sd, ep, ed, ev_p, ev_d, r = free_port_pairs(7, [])  # every one with its next port free
    spec = {"transport": "tcp", "hosts": {
        "p": {"address": "127.0.0.1", "store": {"port": sp, "pool_size": "256MiB", "events_port": ev_p},
              "prefill": [{"port": ep, "threads": 1}]},
        "d": {"address": "127.0.0.1", "store": {"port": sd, "pool_size": "256MiB", "events_port": ev_d},
              "decode": [{"port": ed, "threads": 1, "keep_remote_prefix": True}], "router": {"port": r}}}}
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if k != "KVRELAY_KEYS"}
    children: list[proc.ChildProcess] = []
    router, prefill, decode = (f"http://127.0.0.1:{port}" for port in (r, ep, ed))
    store_p = f"tcp://127.0.0.1:{sp}"
    try:
        for host in ("p", "d"):
            (tmp_path / host).mkdir()
            children.append(proc.spawn_kvrelay(["up", "-f", str(cluster), "--host", host, "--workdir",
                                                str(tmp_path / host)], name=f"kvrelay up {host}",
                                               log=tmp_path / host / "up.log", env=env))
        colocated = proc.spawn_kvrelay(["engine", "--role", "colocated", "--port", "0", "--threads", "1"],
                                       name="colocated", log=tmp_path / "colocated.log",
                                       ready_file=tmp_path / "colocated.json", env=env)
        children.append(colocated)
        last = {"body": ""}

        def ready() -> bool:
            dead = [p.argv for p in children if p.poll() is not None]
            if dead:
                pytest.fail(f"exited: {dead}\n" + "\n".join(
                    f"--- {f}\n{f.read_text()[-2000:]}" for f in sorted(tmp_path.rglob("*.log"))))
            code, last["body"] = _get(f"{router}/readyz")
            if code != 200:
                return False
            body = json.loads(last["body"])
            return bool(body["prefill"]) and bool(body["decode"]) and \
                [s["up"] for s in body.get("stores") or []] == [True]
        wait_until(ready, START_S, "the router ready with the prefill, the decode and p's store",
                   detail=lambda: last["body"], interval=0.2)
        reference = colocated.wait_ready(START_S)["url"]

        rng = random.Random(23)
        prefix = [rng.randrange(3, 32000) for _ in range(PREFIX)]
        held = f'kvrelay_router_index_blocks{{source="{store_p}"}}'
        before = _metric(router, held)
        _complete(prefill, prefix, max_tokens=1)  # computed on p: its KV lands in p's store
        wait_until(lambda: _metric(router, held) >= before + PREFIX // 16, 30,
                   "the router seeing p's store hold the prefix (its KV events, 16 tokens a block)")

        routes = 'kvrelay_router_routes_total{route="store_holds_prefix"}'
        kept = f'kvrelay_router_index_blocks{{source="tcp://127.0.0.1:{sd}"}}'
        kept0 = _metric(router, kept)
        prompt = prefix + [rng.randrange(3, 32000) for _ in range(SUFFIX)]
        loaded = 'kvrelay_engine_prefix_loaded_tokens_total{store="other"}'
        was = _metric(decode, loaded)
        out = _complete(router, prompt)
        assert out == _complete(reference, prompt), "a prefix hinted by the router changed the output"
        assert _metric(router, routes) == 1, "the router did not hint the prefix at p's store"
        assert _metric(decode, loaded) - was == 1024, "the decode did not load the prefix from p's store"
        # keep_remote_prefix: the decode kept the copy in d's store, which announces it to the router too
        wait_until(lambda: _metric(router, kept) >= kept0 + 1024 // 16, 30,
                   "the router seeing d's store hold the kept copy of the prefix")
        fresh = [rng.randrange(3, 32000) for _ in range(PREFIX + SUFFIX)]  # control: no store holds it
        assert _complete(router, fresh) == _complete(reference, fresh)
        assert _metric(router, routes) == 1, "a prompt no store holds was hinted"
    finally:
        for c in children:
            c.signal(signal.SIGTERM)
        for c in children:
            c.stop(30)
    for host in ("p", "d"):
        assert "Traceback" not in (tmp_path / host / "up.log").read_text(), host
