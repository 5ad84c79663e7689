"""`kvrelay bench hosts`, the cluster case (issue 23): a store on every host against one central store, in the
same run, on hosts made of network namespaces.

Two clusters run side by side (each its own namespaces: two prefill hosts ``p1``/``p2``, a decode host ``d``,
a router host ``r``; reference engines, keys, `kvrelay up -f cluster.yaml --host NAME` in each namespace as
tests/multihost/test_store_per_host.py runs them): ``per_host`` with a store on p1, p2 and d, ``central`` with
one store on r.  Repeats alternate between them, the idle one waiting (its engines idle), so both see the
same machine.  Each repeat measures
- KV bytes per request on each link: ``LINK_REQUESTS`` prompts at once, each host veth's rx+tx bytes (read in
  its namespace) over the requests, and the KV the decode pulled (its ``pulled_bytes`` metric); the figure of
  the whole cluster is the bytes all hosts sent per KV byte (one crossing: about 1; a central store: about 2);
  each link's figure is its bytes over all the requests divided by their number (p1 and p2 each prefill about
  half of them, so each carries about half a request's KV per request);
- P/D throughput: ``TPUT_REQUESTS`` requests (400-token prompts, 8 tokens out), ``CONCURRENCY`` in flight, two
  prefill hosts feeding one decode host: requests/s and the KV GB/s the decode pulled.
Outputs are not checked here (the multihost tests do that); a request that recomputed is counted and reported.

Owns: the cluster files of the case, the measurement and its records.  Must not touch: the cluster itself
(kvrelay up), the namespaces' making (netns.py).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import yaml

from kvrelay import proc
from kvrelay.bench.harness import BenchContext, Record

HOSTS = ("p1", "p2", "d", "r")
LAYOUTS = ("per_host", "central")
MODEL = "kvrelay-ref-8l-512-v32000-seed0"
PROMPT_TOKENS = 400
LINK_REQUESTS = 4
TPUT_REQUESTS, TPUT_REQUESTS_QUICK = 24, 8
CONCURRENCY = 4
REPEATS, REPEATS_QUICK = 3, 1
START_S = 300.0
ACROSS = "veth between network namespaces"


def _spec(addresses: dict[str, str], keys: str, layout: str, transport: str) -> dict:
    hosts: dict[str, dict] = {
        "p1": {"address": addresses["p1"], "prefill": [{"port": 8100}]},
        "p2": {"address": addresses["p2"], "prefill": [{"port": 8100}]},
        "d": {"address": addresses["d"], "decode": [{"port": 8200}]},
        "r": {"address": addresses["r"], "router": {"port": 8000}}}
    for name in ("p1", "p2", "d") if layout == "per_host" else ("r",):
        hosts[name]["store"] = {"port": 5600, "pool_size": "256MiB"}
    return {"transport": transport, "keys": keys, "hosts": hosts,
            "env": {"UCX_TLS": "tcp,self", "UCX_LOG_LEVEL": "error"}}


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
    if code != 200:
        raise RuntimeError(f"{url}: HTTP {code}: {text[-300:]}")
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


class Cluster:
    """One layout's four hosts and their `kvrelay up` processes."""

    def __init__(self, layout: str, transport: str, keys: Path, work: Path, stack: ExitStack) -> None:
        from kvrelay.bench import netns
        self.layout, self.keys, self.work = layout, keys, work
        self.hosts = stack.enter_context(netns.Hosts(HOSTS, tag="c" if layout == "per_host" else "k"))
        self.token = (keys / "token").read_text().strip()
        self.router = f"http://{self.hosts.address('r')}:8000"
        work.mkdir(parents=True, exist_ok=True)
        cluster = work / "cluster.yaml"
        cluster.write_text(yaml.safe_dump(_spec({n: self.hosts.address(n) for n in HOSTS}, str(keys), layout,
                                                transport)))
        self.ups: list[proc.ChildProcess] = []
        stack.callback(self.stop)
        for name in HOSTS:
            (work / name).mkdir(parents=True, exist_ok=True)
            self.ups.append(self.hosts.spawn(name, proc.kvrelay_argv(
                ["up", "-f", str(cluster), "--host", name, "--workdir", str(work / name)]), log=work / name / "up.log"))

    def wait_ready(self, timeout: float = START_S) -> None:
        deadline = time.monotonic() + timeout
        body = ""
        while time.monotonic() < deadline:
            dead = [p.argv for p in self.ups if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{self.layout}: kvrelay up exited: {dead} (logs under {self.work})")
            code, body = _get(f"{self.router}/readyz", self.token)
            if code == 200:
                r = json.loads(body)
                stores = [s["up"] for s in r.get("stores") or []] if self.layout == "per_host" else \
                    [(r.get("store") or {}).get("up")]
                if len(r["prefill"]) == 2 and r["decode"] and stores and all(stores):
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{self.layout}: the router at {self.router} was not ready within {timeout:.0f} s: "
                           f"{body[-300:]}")

    def link(self, name: str) -> int:
        """The bytes host ``name``'s veth received and sent so far, read inside its namespace."""
        total = 0
        for what in ("rx", "tx"):
            path = f"/sys/class/net/{self.hosts.devices[name]}/statistics/{what}_bytes"
            total += int(subprocess.run(self.hosts.command(name, ["cat", path]), capture_output=True, text=True,
                                        check=True).stdout)
        return total

    def sent(self, name: str) -> int:
        path = f"/sys/class/net/{self.hosts.devices[name]}/statistics/tx_bytes"
        return int(subprocess.run(self.hosts.command(name, ["cat", path]), capture_output=True, text=True,
                                  check=True).stdout)

    def pulled(self) -> float:
        return _metric(f"http://{self.hosts.address('d')}:8200/metrics", self.token, "kvrelay_engine_pulled_bytes_total")

    def complete(self, prompt: list[int]) -> bool:
        """One request through the router; True if the decode recomputed instead of pulling."""
        body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0.0,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(f"{self.router}/v1/completions", data=body, headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=300) as r:
            out = json.loads(r.read())
        return bool((out.get("kvrelay") or {}).get("recomputed"))

    def send(self, prompts: list[list[int]], concurrency: int) -> tuple[float, int]:
        """``prompts`` through the router, ``concurrency`` at a time: (seconds, requests that recomputed)."""
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            recomputed = sum(pool.map(self.complete, prompts))
        return time.perf_counter() - t0, recomputed

    def stop(self) -> None:
        for p in self.ups:
            p.signal(signal.SIGTERM)
        for p in self.ups:
            p.stop(30)
        self.ups = []


def _prompts(rng: random.Random, n: int) -> list[list[int]]:
    return [[rng.randrange(3, 32000) for _ in range(PROMPT_TOKENS)] for _ in range(n)]


def _measure_once(c: Cluster, rng: random.Random, tput_requests: int) -> dict[str, float]:
    """One repeat on cluster ``c``: per-link bytes per request, bytes sent per KV byte, throughput."""
    out: dict[str, float] = {}
    prompts = _prompts(rng, LINK_REQUESTS)
    before = {n: (c.link(n), c.sent(n)) for n in HOSTS}
    kv0 = c.pulled()
    _, recomputed = c.send(prompts, LINK_REQUESTS)  # at once: both prefill hosts get some
    kv = c.pulled() - kv0
    after = {n: (c.link(n), c.sent(n)) for n in HOSTS}
    for n in HOSTS:
        out[f"link_{n}"] = (after[n][0] - before[n][0]) / LINK_REQUESTS
    out["kv_per_request"] = kv / LINK_REQUESTS
    out["sent_per_kv"] = sum(after[n][1] - before[n][1] for n in HOSTS) / kv if kv else float("nan")
    kv0 = c.pulled()
    seconds, more = c.send(_prompts(rng, tput_requests), CONCURRENCY)
    out["requests_per_s"] = tput_requests / seconds
    out["kv_gbps"] = (c.pulled() - kv0) / seconds / 1e9
    out["recomputed"] = recomputed + more
    return out


def measure(ctx: BenchContext, transport: str = "tcp") -> tuple[dict[str, list[dict[str, float]]], dict[str, str]]:
    """results[layout] = one dict of figures per repeat (``_measure_once``); skipped: why not, where not."""
    from kvrelay.bench import netns
    from kvrelay.security import write_keys
    why = netns.unavailable()
    if why is not None:
        return {}, {"cluster": f"hosts made of network namespaces: {why}"}
    repeats = REPEATS_QUICK if ctx.quick else REPEATS
    tput = TPUT_REQUESTS_QUICK if ctx.quick else TPUT_REQUESTS
    results: dict[str, list[dict[str, float]]] = {layout: [] for layout in LAYOUTS}
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvrelay-bench-cluster-")))
        keys = write_keys(work / "keys")
        clusters = {layout: Cluster(layout, transport, keys, work / layout, stack) for layout in LAYOUTS}
        for c in clusters.values():
            c.wait_ready()
        rng = random.Random(23)
        for c in clusters.values():  # warm-up: first requests pay connections and first allocations
            c.send(_prompts(rng, 2), 2)
        for _ in ctx.steps(range(repeats), "cluster repeats"):
            for layout in LAYOUTS:  # alternating: both layouts see the same machine
                results[layout].append(_measure_once(clusters[layout], rng, tput))
    return results, {}


def add_records(ctx: BenchContext, results: dict[str, list[dict[str, float]]], transport: str = "tcp") -> None:
    """Each figure of ``per_host`` beside ``central``'s, paired by repeat."""
    if not all(results.get(layout) for layout in LAYOUTS):
        return
    per, central = results["per_host"], results["central"]
    params = {"across": ACROSS, "transport": transport, "prompt_tokens": PROMPT_TOKENS,
              "prefill_hosts": 2, "decode_hosts": 1}

    def add(case: str, metric: str, key: str, unit: str, lower: bool, extra: dict | None = None) -> None:
        ctx.add(Record.compare_repeats(ctx.suite, case, metric, [r[key] for r in per], unit, "central-store",
                                       [r[key] for r in central], {**params, **(extra or {})}, lower_is_better=lower))
    add("cluster/all-links", "bytes_sent_per_kv_byte", "sent_per_kv", "x", True,
        {"target": "about 1 with a store per host (one crossing), about 2 with a central store"})
    add("cluster/kv", "kv_bytes_per_request", "kv_per_request", "B", True)
    for n in HOSTS:
        add(f"cluster/link-{n}", "link_bytes_per_request", f"link_{n}", "B", True)
    add("cluster/pd", "requests_per_s", "requests_per_s", "req/s", False, {"concurrency": CONCURRENCY})
    add("cluster/pd", "kv_pulled_gbps", "kv_gbps", "GB/s", False, {"concurrency": CONCURRENCY})


def run(ctx: BenchContext) -> None:
    import sys
    results, skipped = measure(ctx)
    for what, why in skipped.items():
        print(f"hosts: {what} skipped: {why}", file=sys.stderr)
    for layout, reps in results.items():
        recomputed = sum(r["recomputed"] for r in reps)
        if recomputed:
            print(f"hosts: cluster {layout}: {recomputed:.0f} requests recomputed instead of pulling", file=sys.stderr)
    add_records(ctx, results)
