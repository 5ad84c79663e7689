"""A prefix computed on one host reused by a request on another (issue 23), on hosts made of network namespaces:
host "b" runs a store, a prefill engine and a router following both stores' KV events, host "a" a store and
four decode engines (two without, two with ``--keep-remote-prefix``), with keys.  A prompt is prefilled on b (its KV lands in b's store); then a longer
prompt on that prefix goes to a decode engine on a with the router's hint (signed ``kvrelay_prefix_store`` = b's
store): it loads the prefix across the veth and computes the rest, token-identical to a colocated engine.  The
bytes on a's veth show the prefix crossing once; a second request for the prefix on a's other engine crosses
again without the copy, and not at all with it (it reads a's own store).  The figures (bytes, latency) are
printed with -s.  Through the router: it learns from b's store's events that b holds a prompt's prefix, and
sends the longer prompt to the decode alone with that hint (route ``store_holds_prefix``), exact.

Needs root (`ip netns`); skipped with the reason otherwise.  About a minute here.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from kvrelay import proc
from kvrelay.bench import netns
from kvrelay.params import PREFIX_STORE, PREFIX_TOKENS, RELAY_ID
from kvrelay.security import params as signed_params
from kvrelay.security.keyfiles import load as load_keys
from kvrelay.store.pool import unlink_pool

WHY = netns.unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(WHY is not None, reason=f"hosts made of network namespaces: {WHY}")]
START_S = 300.0
MODEL = "kvrelay-ref-8l-512-v32000-seed0"
PREFIX, SUFFIX = 1100, 60  # a 1,024-token prefix is loaded (four 256-token chunks), the rest computed


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from kvrelay.security import write_keys
    work = tmp_path_factory.mktemp("xhost")
    keys = write_keys(work / "keys")
    env = {**os.environ, "KVRELAY_KEYS": str(keys)}
    children: list[proc.ChildProcess] = []
    pools: list[str] = []
    with netns.Hosts(["a", "b"], tag="x") as hosts:
        try:
            def spawn(host: str, label: str, argv: list[str]) -> proc.ChildProcess:
                ready = work / f"{label}.json"
                child = proc.spawn(hosts.command(host, proc.kvrelay_argv([*argv, "--ready-file", str(ready)])),
                                   name=label, log=work / f"{label}.log", ready_file=ready, env=env)
                children.append(child)
                return child
            stores = {}
            for h in ("a", "b"):
                pools.append(f"kvrelay-xhost-{uuid.uuid4().hex[:10]}")
                ip = hosts.address(h)
                stores[h] = spawn(h, f"store-{h}", ["store", "--host", ip, "--port", "5600",
                                                    "--metrics-port", "-1", "--pool-name", pools[-1],
                                                    "--pool-size", "256MiB", "--transports", "shm,tcp",
                                                    "--events", f"tcp://{ip}:5601", "--events-replay",
                                                    f"tcp://{ip}:5602"])
            for s in stores.values():
                s.wait_ready(START_S)
            addr = {h: f"tcp://{hosts.address(h)}:5600" for h in ("a", "b")}
            engines = {"prefill": spawn("b", "prefill", ["engine", "--role", "prefill", "--host", hosts.address("b"),
                                                         "--port", "8100", "--store", addr["b"], "--threads", "1"])}
            for i, keep in enumerate((False, False, True, True)):
                engines[f"decode{i}"] = spawn("a", f"decode{i}", [
                    "engine", "--role", "decode", "--host", hosts.address("a"), "--port", str(8200 + i),
                    "--store", addr["a"], "--peer-store", addr["b"], "--remote-transport", "tcp", "--threads", "1",
                    *(["--keep-remote-prefix"] if keep else [])])
            ip_a, ip_b = hosts.address("a"), hosts.address("b")
            engines["router"] = spawn("b", "router", [  # follows both stores' KV events, with the cluster's keys
                "router", "--host", ip_b, "--port", "8000", "--policy", "cache_aware",
                "--prefill", f"http://{ip_b}:8100", "--decode", f"http://{ip_a}:8201",
                "--prefill-store", f"http://{ip_b}:8100={addr['b']}",
                *(arg for h, ip in (("a", ip_a), ("b", ip_b))
                  for arg in ("--events", f"{addr[h]}=tcp://{ip}:5601,tcp://{ip}:5602"))])
            colocated = proc.spawn_kvrelay(["engine", "--role", "colocated", "--port", "0", "--threads", "1"],
                                           name="colocated", log=work / "colocated.log",
                                           ready_file=work / "colocated.json",
                                           env={k: v for k, v in os.environ.items() if k != "KVRELAY_KEYS"})
            children.append(colocated)
            urls = {name: e.wait_ready(START_S)["url"] for name, e in engines.items()}
            urls["colocated"] = colocated.wait_ready(START_S)["url"]
            yield {"hosts": hosts, "urls": urls, "stores": addr, "keys": keys, "work": work,
                   "token": (keys / "token").read_text().strip()}
        finally:
            for c in children:
                c.stop(30)
            for p in pools:
                unlink_pool(p)


def _post(url: str, body: dict, token: str) -> dict:
    req = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(), headers={
        "Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{url}: HTTP {exc.code}: {exc.read()[:500]!r}") from None


def _rx(hosts: netns.Hosts, name: str) -> int:
    path = f"/sys/class/net/{hosts.devices[name]}/statistics/rx_bytes"
    return int(subprocess.run(hosts.command(name, ["cat", path]), capture_output=True, text=True, check=True).stdout)


def _loaded(c: dict, engine: str) -> dict[str, float]:
    req = urllib.request.Request(f"{c['urls'][engine]}/metrics", headers={"Authorization": f"Bearer {c['token']}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read().decode()
    out = {"own": 0.0, "other": 0.0}
    for line in text.splitlines():
        if line.startswith("kvrelay_engine_prefix_loaded_tokens_total{"):
            out[line.split('store="')[1].split('"')[0]] = float(line.split()[-1])
    return out


def _hinted(c: dict, engine: str, prompt: list[int]) -> tuple[list[int], int, float]:
    """The decode ``engine`` on host a serves ``prompt`` told (signed, as the router does) that b's store holds
    its first PREFIX tokens: its tokens, the bytes a's veth received meanwhile, and the seconds it took."""
    rid = f"xhost-{uuid.uuid4().hex[:8]}"
    params = signed_params.sign(load_keys(c["keys"]), {PREFIX_STORE: c["stores"]["b"], PREFIX_TOKENS: PREFIX,
                                                       RELAY_ID: rid}, rid)
    rx0, t0 = _rx(c["hosts"], "a"), time.perf_counter()
    out = _post(c["urls"][engine], {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0.0,
                                    "ignore_eos": True, "request_id": rid, "kv_transfer_params": params}, c["token"])
    took, rx = time.perf_counter() - t0, _rx(c["hosts"], "a") - rx0
    assert not out.get("kvrelay"), f"the decode recomputed: {out['kvrelay']}"
    return out["choices"][0]["token_ids"], rx, took


def _colocated(c: dict, prompt: list[int]) -> list[int]:
    return _post(c["urls"]["colocated"], {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0.0,
                                          "ignore_eos": True}, "")["choices"][0]["token_ids"]


@pytest.mark.timeout(900)
def test_a_prefix_computed_on_one_host_is_reused_on_another(cluster):
    c = cluster
    kv = 1024 * 8 * 2 * 2 * 64 * 4  # tokens x layers x (K, V) x KV heads x head dim x fp32: the reference model
    figures = {}
    for keep, (first, second) in ((False, ("decode0", "decode1")), (True, ("decode2", "decode3"))):
        rng = random.Random(7 if keep else 8)  # each setting its own prefix: a copy never serves the other
        prefix = [rng.randrange(3, 32000) for _ in range(PREFIX)]
        prompts = [prefix + [rng.randrange(3, 32000) for _ in range(SUFFIX)] for _ in range(2)]
        _post(c["urls"]["prefill"], {"model": MODEL, "prompt": prefix, "max_tokens": 1}, c["token"])  # on host b
        runs = []
        for engine, prompt in ((first, prompts[0]), (second, prompts[1])):
            tokens, rx, took = _hinted(c, engine, prompt)
            assert tokens == _colocated(c, prompt), f"{engine}: a prefix loaded across hosts changed the output"
            runs.append((rx, took, _loaded(c, engine)))
        (rx1, t1, loaded1), (rx2, t2, loaded2) = runs
        assert loaded1 == {"own": 0, "other": 1024} and rx1 >= kv, (loaded1, rx1)  # the prefix crossed once
        if keep:  # the copy in a's store serves the second request: nothing crosses
            assert loaded2 == {"own": 1024, "other": 0} and rx2 < 0.05 * kv, (loaded2, rx2)
        else:
            assert loaded2 == {"own": 0, "other": 1024} and rx2 >= kv, (loaded2, rx2)
        figures[keep] = (rx1, t1, rx2, t2)
    other = _colocated(c, [prompts[0][0] + 1, *prompts[0][1:]])
    assert other != _colocated(c, prompts[0]), "negative control: one changed token changed nothing"
    print(f"\nprefix of 1,024 tokens ({kv / 1e6:.1f} MB of KV) from host b's store to host a, over tcp on a veth:")
    for keep, (rx1, t1, rx2, t2) in figures.items():
        print(f"  keep copy {keep}: first request {rx1 / 1e6:.2f} MB into a, {t1 * 1e3:.0f} ms; second request on "
              f"a's other engine {rx2 / 1e6:.2f} MB, {t2 * 1e3:.0f} ms")


def test_work_dir_holds_no_traceback(cluster):
    for log in Path(cluster["work"]).glob("*.log"):
        assert "Traceback" not in log.read_text(), log


def _metric(url: str, token: str, line_start: str) -> float:
    req = urllib.request.Request(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return sum(float(line.split()[-1]) for line in r.read().decode().splitlines() if line.startswith(line_start))


@pytest.mark.timeout(600)
def test_the_router_hints_at_the_host_whose_store_holds_the_prefix(cluster):
    from waiting import wait_until
    c = cluster
    router, store_b = c["urls"]["router"], c["stores"]["b"]
    rng = random.Random(9)
    prefix = [rng.randrange(3, 32000) for _ in range(PREFIX)]
    prompt = prefix + [rng.randrange(3, 32000) for _ in range(SUFFIX)]
    before = _loaded(c, "decode1")["other"]
    held0 = _metric(router, c["token"], f'kvrelay_router_index_blocks{{source="{store_b}"}}')
    _post(c["urls"]["prefill"], {"model": MODEL, "prompt": prefix, "max_tokens": 1}, c["token"])  # into b's store
    # b's store announces the prefix's blocks (16 tokens each at the store's event block size)
    wait_until(lambda: _metric(router, c["token"], f'kvrelay_router_index_blocks{{source="{store_b}"}}')
               >= held0 + PREFIX // 16, 20, "the router seeing b's store hold the prefix")
    out = _post(router, {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0.0, "ignore_eos": True},
                c["token"])
    assert out["choices"][0]["token_ids"] == _colocated(c, prompt), "a prefix hinted by the router changed the output"
    assert not out.get("kvrelay"), out.get("kvrelay")
    assert _metric(router, c["token"], 'kvrelay_router_routes_total{route="store_holds_prefix"}') == 1
    assert _loaded(c, "decode1")["other"] - before == 1024  # loaded from b's store, the rest computed on a

