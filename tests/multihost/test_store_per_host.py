"""One network crossing per KV byte with a store on every host (issue 23), on hosts made of network
namespaces: two prefill hosts with a store each, a decode host with its store, a router host, reference
engines, keys, over tcp and over nixl (UCX over tcp on the veths); `kvrelay up -f cluster.yaml --host NAME` in each namespace.  Greedy output must be
token-identical to a colocated engine's; the bytes each host's veth sent and received (its
/sys/class/net/<veth>/statistics, read inside the namespace) show each request's KV leaving its prefill
host once and arriving at the decode host once, and none on the router host's link.  The control: the same
hosts with one central store (on the router host) show the second crossing: that host's link carries every
KV byte twice (in from the prefill, out to the decode).

Needs root (`ip netns`); skipped with the reason otherwise.  About a minute per transport here.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from kvrelay import proc
from kvrelay.bench import netns
from waiting import wait_until

WHY = netns.unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(WHY is not None, reason=f"hosts made of network namespaces: {WHY}")]
HOSTS = ("p1", "p2", "d", "r")
START_S = 300.0
MODEL = "kvrelay-ref-8l-512-v32000-seed0"


@pytest.fixture(scope="module")
def hosts():
    with netns.Hosts(HOSTS, tag="s") as h:
        yield h


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    from kvrelay.security import write_keys
    return write_keys(tmp_path_factory.mktemp("sph") / "keys")


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


def _spec(hosts: netns.Hosts, keys: Path, per_host: bool, transport: str) -> dict:
    store = {"port": 5600, "pool_size": "256MiB"}
    h = {"p1": {"address": hosts.address("p1"), "prefill": [{"port": 8100}]},
         "p2": {"address": hosts.address("p2"), "prefill": [{"port": 8100}]},
         "d": {"address": hosts.address("d"), "decode": [{"port": 8200}]},
         "r": {"address": hosts.address("r"), "router": {"port": 8000}}}
    for name in ("p1", "p2", "d") if per_host else ("r",):
        h[name]["store"] = dict(store)
    return {"transport": transport, "keys": str(keys), "hosts": h,
            "env": {"UCX_TLS": "tcp,self", "UCX_LOG_LEVEL": "error"}}  # nixl: UCX over tcp on the veths


def _get(url: str, token: str) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def _metric(url: str, token: str, name: str) -> float:
    code, text = _get(url, token)
    assert code == 200, text[-500:]
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def _link(hosts: netns.Hosts, name: str) -> dict[str, int]:
    """The bytes host ``name``'s veth received and sent so far, read inside its namespace."""
    out = {}
    for what in ("rx", "tx"):
        path = f"/sys/class/net/{hosts.devices[name]}/statistics/{what}_bytes"
        out[what] = int(subprocess.run(hosts.command(name, ["cat", path]), capture_output=True, text=True,
                                       check=True).stdout)
    return out


def _complete(url: str, token: str, prompt: list[int]) -> tuple[list[int], dict]:
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0.0,
                       "return_token_ids": True, "ignore_eos": True}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", data=body, headers={
        "Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})})
    with urllib.request.urlopen(req, timeout=300) as r:
        out = json.loads(r.read())
    return out["choices"][0]["token_ids"], out.get("kvrelay") or {}


def _run(hosts: netns.Hosts, keys: Path, colocated: str, work: Path, per_host: bool, seed: int,
         transport: str) -> dict:
    """Start the cluster, send four prompts at once (both prefill hosts get some), check them against the
    colocated engine; the KV bytes the decode pulled, and each link's bytes during the requests."""
    cluster = work / "cluster.yaml"
    cluster.write_text(yaml.safe_dump(_spec(hosts, keys, per_host, transport)))
    token = (keys / "token").read_text().strip()
    router = f"http://{hosts.address('r')}:8000"
    ups = []
    try:
        for name in HOSTS:
            (work / name).mkdir()
            ups.append(hosts.spawn(name, proc.kvrelay_argv(["up", "-f", str(cluster), "--host", name, "--workdir",
                                                            str(work / name)]), log=work / name / "up.log"))
        last = {"body": ""}

        def ready() -> bool:
            dead = [p.argv for p in ups if p.poll() is not None]
            if dead:
                pytest.fail(f"kvrelay up exited: {dead}\n" + "\n".join(
                    f"--- {f}\n{f.read_text()[-2000:]}" for f in sorted(work.rglob("*.log"))))
            code, last["body"] = _get(f"{router}/readyz", token)
            if code != 200:
                return False
            r = json.loads(last["body"])
            stores = [s["up"] for s in r.get("stores") or []] if per_host else [(r.get("store") or {}).get("up")]
            return len(r["prefill"]) == 2 and bool(r["decode"]) and bool(stores) and all(stores)
        wait_until(ready, START_S, f"the router at {router} ready", detail=lambda: last["body"], interval=0.2)
        rng = random.Random(seed)
        prompts = [[rng.randrange(3, 32000) for _ in range(400)] for _ in range(4)]
        decode_metrics = f"http://{hosts.address('d')}:8200/metrics"
        pulled0 = _metric(decode_metrics, token, "kvrelay_engine_pulled_bytes_total")
        before = {n: _link(hosts, n) for n in HOSTS}
        with ThreadPoolExecutor(len(prompts)) as pool:  # at once: least_loaded spreads them over both prefills
            answers = list(pool.map(lambda p: _complete(router, token, p), prompts))
        after = {n: _link(hosts, n) for n in HOSTS}
        kv = _metric(decode_metrics, token, "kvrelay_engine_pulled_bytes_total") - pulled0
        published = [_metric(f"http://{hosts.address(p)}:8100/metrics", token, "kvrelay_engine_published_bytes_total")
                     for p in ("p1", "p2")]
        for prompt, (pd, info) in zip(prompts, answers, strict=True):
            assert not info.get("recomputed"), f"the decode recomputed instead of pulling: {info}"
            assert pd == _complete(colocated, "", prompt)[0], "P/D across namespaces differs from colocated"
        other, _ = _complete(colocated, "", [prompts[0][0] + 1, *prompts[0][1:]])
        assert other != answers[0][0], "negative control: one changed token changed nothing"
        links = {n: {k: after[n][k] - before[n][k] for k in ("rx", "tx")} for n in HOSTS}
        for p in ("p1", "p2") if per_host else ():  # the router follows each store's KV events (CURVE, `up` set it)
            held = f'kvrelay_router_index_blocks{{source="tcp://{hosts.address(p)}:5600"}}'
            wait_until(lambda held=held: _metric(f"{router}/metrics", token, held) > 0, 30,
                       f"the router following {p}'s store's KV events")
        return {"kv": kv, "published": published, "links": links}
    finally:
        for p in ups:
            p.signal(signal.SIGTERM)
        for p in ups:
            p.stop(30)
        for name in HOSTS:
            log = work / name / "up.log"
            assert not log.exists() or "Traceback" not in log.read_text(), name


@pytest.mark.timeout(900)
@pytest.mark.parametrize("transport", ["tcp", "nixl"])
def test_each_kv_byte_crosses_the_network_once_with_a_store_per_host(hosts, keys, colocated, tmp_path, transport):
    from kvrelay.transfer import available_transports
    why = available_transports().get(transport, "unknown")
    if why is not None:
        pytest.skip(f"transport {transport} is not usable here: {why}")
    (tmp_path / "per_host").mkdir()
    (tmp_path / "central").mkdir()
    seed = 23 if transport == "tcp" else 33  # fresh prompts: the engines and stores keep those of earlier runs
    per_host = _run(hosts, keys, colocated, tmp_path / "per_host", per_host=True, seed=seed, transport=transport)
    central = _run(hosts, keys, colocated, tmp_path / "central", per_host=False, seed=seed + 1, transport=transport)
    for name, run in ((f"{transport}, store per host", per_host), (f"{transport}, central store", central)):
        kv, links = run["kv"], run["links"]
        sent = sum(link["tx"] for link in links.values())
        print(f"\n{name}: KV pulled {kv / 1e6:.2f} MB; per link (MB, rx/tx): " + ", ".join(
            f"{n} {link['rx'] / 1e6:.2f}/{link['tx'] / 1e6:.2f}" for n, link in links.items()) +
            f"; bytes sent by all hosts / KV = {sent / kv:.2f}")
        assert kv > 0 and all(run["published"]), f"{name}: both prefill hosts published, the decode pulled: {run}"
    kv, links = per_host["kv"], per_host["links"]
    # once: out of the prefill hosts, into the decode host, and nowhere else (protocol and HTTP overhead < 25%)
    assert kv <= links["p1"]["tx"] + links["p2"]["tx"] < 1.25 * kv
    assert kv <= links["d"]["rx"] < 1.25 * kv
    assert links["r"]["rx"] + links["r"]["tx"] < 0.05 * kv, "KV on the router host's link"
    assert links["d"]["tx"] < 0.1 * kv, "the decode host sent KV"
    assert sum(link["tx"] for link in links.values()) < 1.3 * kv
    # the control: a central store's host takes every byte in and sends it out again
    ckv, clinks = central["kv"], central["links"]
    assert clinks["r"]["rx"] >= ckv and clinks["r"]["tx"] >= ckv
    assert sum(link["tx"] for link in clinks.values()) >= 1.9 * ckv
