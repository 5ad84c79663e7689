"""Several hosts made of network namespaces: `kvrelay up -f cluster.yaml --host NAME` in each of four
namespaces (store, prefill, decode, router), joined by veth pairs to a bridge, with keys; the openai
client in the root namespace sends requests to the router's address.  Greedy P/D output must be
token-identical to a colocated engine's, the KV must have crossed the namespaces (the decode pulled it
and did not recompute), and another prompt must give other tokens (negative control).  Over tcp, and
over nixl (UCX over tcp on the veth: UCX_TLS=tcp,self, UCX_NET_DEVICES set by `kvrelay up` from the
host's address).

Needs root (`ip netns`); skipped with the reason otherwise.  About 60-90 s per transport here.
"""

from __future__ import annotations

import json
import os
import random
import signal
import urllib.request
from pathlib import Path

import pytest
import yaml

from kvrelay import proc
from kvrelay.bench import netns
from waiting import wait_until

WHY = netns.unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(WHY is not None, reason=f"hosts made of network namespaces: {WHY}")]
ROLES = ("store", "prefill", "decode", "router")
START_S = 300.0
MODEL = "kvrelay-ref-8l-512-v32000-seed0"  # the seeded random reference model every engine serves


@pytest.fixture(scope="module")
def hosts():
    with netns.Hosts(ROLES, tag="m") as h:
        yield h


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    from kvrelay.security import write_keys
    return write_keys(tmp_path_factory.mktemp("mh") / "keys")


def _stop(procs: list[proc.ChildProcess]) -> None:
    for p in procs:
        p.signal(signal.SIGTERM)
    for p in procs:
        p.stop(30)  # up to 30 s after the SIGTERM above, then SIGKILL


@pytest.fixture(scope="module")
def colocated(tmp_path_factory):
    """The reference: a colocated engine of the same (seeded) model on this namespace's loopback, no keys."""
    d = tmp_path_factory.mktemp("colocated")
    env = {k: v for k, v in os.environ.items() if k != "KVRELAY_KEYS"}
    engine = proc.spawn_kvrelay(["engine", "--role", "colocated", "--port", "0"], name="colocated engine",
                                log=d / "log", ready_file=d / "ready.json", env=env)
    try:
        yield engine.wait_ready(START_S)["url"]
    finally:
        _stop([engine])


def _cluster_file(path: Path, hosts: netns.Hosts, keys: Path, transport: str) -> Path:
    spec = {"transport": transport, "keys": str(keys), "env": {"UCX_TLS": "tcp,self", "UCX_LOG_LEVEL": "error"},
            "hosts": {"store": {"address": hosts.address("store"), "store": {"port": 5600, "pool_size": "256MiB"}},
                      "prefill": {"address": hosts.address("prefill"), "prefill": [{"port": 8100}]},
                      "decode": {"address": hosts.address("decode"), "decode": [{"port": 8200}]},
                      "router": {"address": hosts.address("router"), "router": {"port": 8000}}}}
    path.write_text(yaml.safe_dump(spec))
    return path


def _get(url: str, token: str = "") -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def _wait_router(url: str, procs: list[proc.ChildProcess], logs: Path) -> None:
    last = {"body": ""}

    def ready() -> bool:
        dead = [p.argv for p in procs if p.poll() is not None]
        if dead:
            pytest.fail(f"kvrelay up exited: {dead}\n" + "\n".join(
                f"--- {f}\n{f.read_text()[-2000:]}" for f in sorted(logs.rglob("*.log"))))
        code, last["body"] = _get(f"{url}/readyz")
        if code != 200:
            return False
        r = json.loads(last["body"])
        return bool(r["prefill"] and r["decode"] and (r.get("store") or {}).get("up"))
    wait_until(ready, START_S, f"the router at {url} ready with a prefill, a decode and the store",
               detail=lambda: last["body"], interval=0.2)


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("transport", ["tcp", "nixl"])
def test_pd_across_namespaces(hosts, keys, colocated, transport, tmp_path):
    from kvrelay.transfer import available_transports
    why = available_transports().get(transport, "unknown")
    if why is not None:
        pytest.skip(f"transport {transport} is not usable here: {why}")
    openai = pytest.importorskip("openai")
    cluster = _cluster_file(tmp_path / "cluster.yaml", hosts, keys, transport)
    procs = []
    try:
        for name in ROLES:
            work = tmp_path / name
            work.mkdir()
            which = [] if name == "router" else ["--host", name]  # the router's host finds itself by address
            procs.append(hosts.spawn(name, proc.kvrelay_argv(["up", "-f", str(cluster), *which, "--workdir", str(work)]),
                                     log=work / "up.log"))
        router = f"http://{hosts.address('router')}:8000"
        _wait_router(router, procs, tmp_path)
        token = (keys / "token").read_text().strip()
        client = openai.OpenAI(base_url=f"{router}/v1", api_key=token, max_retries=0, timeout=300)
        local = openai.OpenAI(base_url=f"{colocated}/v1", api_key="none", max_retries=0, timeout=300)
        rng = random.Random(16)
        prompts = [[rng.randrange(3, 32000) for _ in range(n)] for n in (300, 40)]
        extra = {"return_token_ids": True, "ignore_eos": True}

        def complete(c, prompt):
            r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0.0, extra_body=extra)
            return r.choices[0].model_extra["token_ids"], (r.model_extra or {}).get("kvrelay", {})

        for prompt in prompts:
            pd, info = complete(client, prompt)
            ref, _ = complete(local, prompt)
            assert pd == ref, f"P/D over {transport} across namespaces differs from the colocated engine"
            assert not info.get("recomputed"), f"the decode recomputed instead of pulling the KV: {info}"
            other, _ = complete(local, [prompt[0] + 1, *prompt[1:]])  # negative control: one token changed
            assert other != pd, "a different prompt gave the same tokens: the comparison proves nothing"
        code, text = _get(f"http://{hosts.address('decode')}:8200/metrics", token)
        assert code == 200 and _metric(text, "kvrelay_engine_pulled_bytes_total") > 0, text[-1500:]
        code, text = _get(f"http://{hosts.address('prefill')}:8100/metrics", token)
        assert code == 200 and _metric(text, "kvrelay_engine_published_bytes_total") > 0, text[-1500:]
    finally:
        _stop(procs)
    for name in ROLES:
        assert "Traceback" not in (tmp_path / name / "up.log").read_text(), name
