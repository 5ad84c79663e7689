"""`kvrelay bench faults`: faults injected into a live `kvrelay up` cluster under streaming load, with every
answer checked against a colocated engine's.

Owns: the fault scenarios, the load they run under, and their figures.  Must not touch: the cluster's
processes except to break them (kvrelay/launcher.py and kvrelay/supervisor.py run and restart them).

Each scenario starts its own cluster (``kvrelay up --transport tcp``, 2 prefill and 2 decode reference
engines, the router, the store, all supervised), warms it up, records a baseline (file descriptors and
threads of every process, /dev/shm), then sends ``concurrency`` streaming requests at a time through the
router with the official ``openai`` client while the fault is injected.  Per scenario it reports:
  sent, correct (token-identical to the colocated engine), clear_errors (the client raised an API error),
  wrong (finished without error but different: must be 0), hung (no answer within the client's timeout:
  must be 0), leaks (after the load: KV blocks not free, store reservations and pins, kvrelay shm segments
  beyond the live pool, file descriptors and threads grown in processes that were not restarted: must be
  0), and recovery_s (fault to the first probe request answered correctly again; for the store, answered
  with its KV pulled from the store again; target <= 5 s).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kvrelay.bench.harness import BenchContext, Record
from kvrelay.store.process import die_with_parent

SUITE = "faults"
MAX_TOKENS = 12
VOCAB_LO, VOCAB_HI = 16, 1000  # inside every reference model's vocabulary
CLIENT_TIMEOUT = 90.0  # a request not answered by then is "hung"
RECOVERY_TARGET_S = 5.0
PIN_TTL_S = 30.0  # the store's pull_pin_ttl default: a pin older than this is a leak


@dataclass
class Outcome:
    kind: str  # correct, clear_error, wrong, hung
    detail: str = ""
    seconds: float = 0.0


@dataclass
class Figures:
    scenario: str
    outcomes: list[Outcome] = field(default_factory=list)
    leaks: dict[str, int] = field(default_factory=dict)
    recovery_s: float = float("nan")  # fault (for the store: its return) to every component back in service
    first_answer_s: float = float("nan")  # fault to the first right answer of a request sent after it
    notes: list[str] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(o.kind == kind for o in self.outcomes)

    def summary(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "sent": len(self.outcomes), "correct": self.count("correct"),
                "clear_errors": self.count("clear_error"), "wrong": self.count("wrong"), "hung": self.count("hung"),
                "leaks": sum(self.leaks.values()), "leak_detail": {k: v for k, v in self.leaks.items() if v},
                "recovery_s": self.recovery_s, "first_answer_s": self.first_answer_s, "max_request_s": max((o.seconds for o in self.outcomes), default=0.0),
                "notes": self.notes}


def _get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def _post(url: str, body: dict, timeout: float = 60.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (Prometheus text format)."""
    from kvrelay.engines.vllm.process import parse_metrics, sum_samples
    return sum_samples(parse_metrics(text), name, **labels)


class UpCluster:
    """A `kvrelay up` process (everything it starts is supervised) and a colocated engine beside it."""

    def __init__(self, workdir: Path, *, transport: str = "tcp", pool_size: str = "256MiB", num_prefill: int = 2,
                 num_decode: int = 2, store_env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **(store_env or {})}
        self.log = open(workdir / "up.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvrelay.cli", "up", "--transport", transport, "--port", "0", "--pool-size",
             pool_size, "--num-prefill", str(num_prefill), "--num-decode", str(num_decode), "--workdir",
             str(workdir)], stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True, preexec_fn=die_with_parent)  # a killed bench leaves no cluster behind
        ready = workdir / "colocated.json"
        self.colo = subprocess.Popen([sys.executable, "-m", "kvrelay.cli", "engine", "--role", "colocated", "--port",
                                      "0", "--ready-file", str(ready)], stdout=open(workdir / "colocated.log", "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent)
        self.router = ""
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvrelay up exited with {self.proc.returncode}: "
                                   f"{(workdir / 'up.log').read_text()[-2000:]}")
            router = self.process("router")
            if router and router.get("state") == "running" and ready.exists():
                try:
                    self.router = router["address"]
                    if json.loads(_get(f"{self.router}/readyz")).get("ready"):
                        break
                except (OSError, ValueError):
                    pass
            time.sleep(0.2)
        else:
            raise TimeoutError(f"the cluster in {workdir} was not ready within 180 s")
        self.colocated = json.loads(ready.read_text())["url"]
        self.model = json.loads(_get(f"{self.router}/v1/models"))["data"][0]["id"]

    def state(self) -> dict[str, Any]:
        try:
            return json.loads((self.workdir / "up.json").read_text())
        except (OSError, ValueError):
            return {}

    def process(self, name: str) -> dict[str, Any] | None:
        return next((p for p in self.state().get("processes", []) if p["name"] == name), None)

    def pid(self, name: str) -> int:
        p = self.process(name)
        if not p or not p.get("pid"):
            raise RuntimeError(f"no process {name!r} in {self.workdir}/up.json")
        return int(p["pid"])

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        pid = self.pid(name)
        os.kill(pid, sig)
        return pid

    def close(self) -> None:
        for p in (self.proc, self.colo):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (self.proc, self.colo):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        self.log.close()


class Load:
    """Streaming requests through the router with the official openai client, checked against the colocated
    engine's answers (computed first, non-streaming)."""

    def __init__(self, cluster: UpCluster, n: int, seed: int, lengths: tuple[int, ...] = (40, 200, 600, 1100)):
        rng = random.Random(seed)
        self.cluster = cluster
        self.prompts = [[rng.randrange(VOCAB_LO, VOCAB_HI) for _ in range(lengths[i % len(lengths)])]
                        for i in range(n)]
        self.expected = [reference(cluster, p) for p in self.prompts]
        self.started = 0
        self.streaming = 0  # requests that received their first token
        self._lock = threading.Lock()

    def one(self, i: int, disconnect_after: int = 0) -> Outcome:
        import openai
        client = openai.OpenAI(base_url=f"{self.cluster.router}/v1", api_key="unused", timeout=CLIENT_TIMEOUT,
                               max_retries=0)
        t0 = time.monotonic()
        got: list[int] = []
        with self._lock:
            self.started += 1
        try:
            stream = client.completions.create(model=self.cluster.model, prompt=self.prompts[i],
                                               max_tokens=MAX_TOKENS, temperature=0.0, stream=True,
                                               extra_body={"ignore_eos": True, "return_token_ids": True})
            for chunk in stream:
                ids = (chunk.choices[0].model_extra or {}).get("token_ids") or [] if chunk.choices else []
                if ids and not got:
                    with self._lock:
                        self.streaming += 1
                got += ids
                if disconnect_after and len(got) >= disconnect_after:
                    stream.close()  # the client goes away mid-stream
                    return Outcome("correct" if got == self.expected[i][:len(got)] else "wrong",
                                   "disconnected", time.monotonic() - t0)
        except openai.APITimeoutError as exc:
            return Outcome("hung", str(exc), time.monotonic() - t0)
        except openai.APIError as exc:
            return Outcome("clear_error", f"{type(exc).__name__}: {exc}"[:300], time.monotonic() - t0)
        kind = "correct" if got == self.expected[i] else "wrong"
        return Outcome(kind, "" if kind == "correct" else f"got {got} want {self.expected[i]}", time.monotonic() - t0)

    def run(self, concurrency: int, disconnect_after: int = 0) -> list[Outcome]:
        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(lambda i: self.one(i, disconnect_after), range(len(self.prompts))))


def reference(cluster: UpCluster, prompt: list[int]) -> list[int]:
    """The colocated engine's greedy answer."""
    body = {"model": cluster.model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True}
    return _post(f"{cluster.colocated}/v1/completions", body)["choices"][0]["token_ids"]


def _pulled_ok(cluster: UpCluster) -> float:
    """Pulls that succeeded, over every decode engine (a decode answering without its store does not count)."""
    total = 0.0
    for p in cluster.state().get("processes", []):
        if p["name"].startswith("decode"):
            try:
                total += _metric(_get(f"{p['address']}/metrics"), "kvrelay_engine_pulls_total", result="ok")
            except OSError:
                pass
    return total


def probe_ok(cluster: UpCluster, prompt: list[int], want: list[int], need_kv: bool) -> bool:
    """One non-streaming request through the router: the right answer (and, with need_kv, its KV pulled
    from the store by the decode: P/D as normal, not a decode computing alone)."""
    body = {"model": cluster.model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True}
    pulled = _pulled_ok(cluster) if need_kv else 0.0
    try:
        ans = _post(f"{cluster.router}/v1/completions", body, timeout=30)
    except (OSError, ValueError):
        return False
    if ans.get("choices", [{}])[0].get("token_ids") != want:
        return False
    return not need_kv or _pulled_ok(cluster) > pulled


def store_in_service(cluster: UpCluster) -> bool:
    """Every engine's store breaker is closed and the router sees the store up."""
    for p in cluster.state().get("processes", []):
        try:
            text = _get(f"{p['address']}/metrics") if p["name"].startswith(("prefill", "decode", "router")) else ""
        except OSError:
            return False
        if p["name"] == "router" and _metric(text, "kvrelay_router_store_up") < 1:
            return False
        if p["name"] != "router" and _metric(text, "kvrelay_engine_store_breaker_open") > 0:
            return False
    return True


def store_recovery(cluster: UpCluster, since: float, fig: Figures, limit: float = 60.0) -> float:
    """Seconds from ``since`` until every component has the store back in service; the first P/D answer after
    that (it queues behind the load still running) goes in the notes."""
    while time.monotonic() - since < limit and not store_in_service(cluster):
        time.sleep(0.05)
    back = time.monotonic() - since
    fig.first_answer_s = recovery(cluster, since, need_kv=True, seed=14, limit=limit)
    fig.notes.append(f"every breaker closed {back:.2f}s after the store's return; the first request sent then "
                     f"answered with its KV pulled at {fig.first_answer_s:.2f}s (behind the load still running)")
    return back


def recovery(cluster: UpCluster, since: float, need_kv: bool, seed: int, limit: float = 60.0) -> float:
    rng = random.Random(seed)
    while time.monotonic() - since < limit:
        prompt = [rng.randrange(VOCAB_LO, VOCAB_HI) for _ in range(64)]
        want = reference(cluster, prompt)
        if probe_ok(cluster, prompt, want, need_kv):
            return time.monotonic() - since
        time.sleep(0.1)
    return float("inf")


# ---- leaks --------------------------------------------------------------------------------------------
def _proc_counts(pid: int) -> tuple[int, int]:
    try:
        return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return -1, -1


def _fd_targets(pid: int) -> Counter[str]:
    out: Counter[str] = Counter()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            out[target.split(":[")[0] if ":[" in target else target] += 1
    except OSError:
        pass
    return out


def snapshot(cluster: UpCluster) -> dict[str, Any]:
    procs = {p["name"]: int(p["pid"]) for p in cluster.state().get("processes", []) if p.get("pid")}
    mine = f"kvrelay-up-{cluster.proc.pid}"  # the pool kvrelay up names for its store (and its .dir)
    return {"pids": procs, "counts": {n: _proc_counts(pid) for n, pid in procs.items()},
            "fds": {n: _fd_targets(pid) for n, pid in procs.items()},
            "shm": sorted(f for f in os.listdir("/dev/shm") if f.startswith(mine))}


def leaks(cluster: UpCluster, before: dict[str, Any], warm: dict[str, Any], fig: Figures, fd_slack: int = 8,
          thread_slack: int = 4, router_fd_slack: int = 40) -> dict[str, int]:
    """After the load has drained: what was not given back (new file descriptors are named in the notes)."""
    time.sleep(1.0)
    out: dict[str, int] = {}
    now = snapshot(cluster)
    for name, pid in now["pids"].items():
        if before["pids"].get(name) != pid or warm["pids"].get(name) != pid:
            continue  # restarted: a fresh process still warming up (its pools, links) is not leaking
        fd0, th0 = before["counts"][name]
        fd1, th1 = now["counts"][name]
        # the router pools its upstream connections (two legs per request): that pool may still be filling
        out[f"fds:{name}"] = max(0, fd1 - fd0 - (router_fd_slack if name == "router" else fd_slack))
        out[f"threads:{name}"] = max(0, th1 - th0 - thread_slack)
        if out[f"fds:{name}"]:
            grown = now["fds"][name] - before["fds"][name]
            fig.notes.append(f"{name}: new file descriptors {dict(grown.most_common(6))}")
    # kvrelay up's store pool keeps its name across restarts: more files under it than before is a leak
    out["shm_segments"] = max(0, len(now["shm"]) - len(before["shm"]))
    for p in cluster.state().get("processes", []):
        url = p.get("address", "")
        try:
            if p["name"].startswith(("prefill", "decode")):
                text = _get(f"{url}/metrics")
                out[f"busy_seqs:{p['name']}"] = int(_metric(text, "kvrelay_engine_running")
                                                    + _metric(text, "kvrelay_engine_waiting"))
            elif p["name"] == "store" and p.get("health_url"):
                url = p["health_url"].replace("/healthz", "/metrics")
                deadline = time.monotonic() + PIN_TTL_S + 5
                while True:  # pins are handed back with a client's next call, or expire: wait for either
                    text = _get(url)
                    held = _metric(text, "kvrelay_store_chunks", tier="reserved") + _metric(text, "kvrelay_store_pins")
                    if not held or time.monotonic() > deadline:
                        break
                    time.sleep(1.0)
                out["store_reserved_chunks"] = int(_metric(text, "kvrelay_store_chunks", tier="reserved"))
                out["store_pins"] = int(_metric(text, "kvrelay_store_pins"))
        except OSError:
            out[f"unreachable:{p['name']}"] = 1
    return out


# ---- scenarios ----------------------------------------------------------------------------------------
Scenario = Callable[[UpCluster, Load, Figures], "threading.Thread | None"]


def _after_streaming(load: Load, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while load.streaming < n and time.monotonic() < deadline:
        time.sleep(0.01)


def _in_background(fn: Callable[[], None]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def all_workers_in_service(cluster: UpCluster) -> bool:
    """The router has every prefill and decode worker in service (their breakers closed)."""
    try:
        ready = json.loads(_get(f"{cluster.router}/readyz"))
    except (OSError, ValueError):
        return False
    # half-open: a probe answered and the router sends it requests again (one success closes it)
    return all(b["state"] in ("closed", "half_open") for role in ("prefill", "decode")
               for b in ready["breakers"][role])


def restarted(cluster: UpCluster, name: str, old_pid: int, limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        p = cluster.process(name) or {}
        if p.get("pid") not in (None, old_pid) and p.get("state") == "running":
            return
        time.sleep(0.05)


def heal(cluster: UpCluster, fig: Figures, name: str, t_kill: float, old_pid: int, need_kv: bool,
         seed: int) -> None:
    """After killing ``name``: the first right answer, then the killed process restarted and back in service."""
    fig.first_answer_s = recovery(cluster, t_kill, need_kv=need_kv, seed=seed)
    restarted(cluster, name, old_pid)
    deadline = time.monotonic() + 60
    while not all_workers_in_service(cluster) and time.monotonic() < deadline:
        time.sleep(0.05)
    fig.recovery_s = time.monotonic() - t_kill
    fig.notes.append(f"{name} restarted and back in the router's service {fig.recovery_s:.1f}s after its kill "
                     f"(mostly the engine loading its model); requests kept being served meanwhile")


def kill_prefill(cluster: UpCluster, load: Load, fig: Figures) -> threading.Thread:
    def fault() -> None:
        _after_streaming(load, 1)
        pid, t = cluster.kill("prefill0"), time.monotonic()
        fig.notes.append(f"killed prefill0 (pid {pid}) after the first token")
        heal(cluster, fig, "prefill0", t, pid, need_kv=False, seed=11)
    return _in_background(fault)


def kill_decode_early(cluster: UpCluster, load: Load, fig: Figures) -> threading.Thread:
    def fault() -> None:
        while load.started < 2:
            time.sleep(0.001)
        pid, t = cluster.kill("decode0"), time.monotonic()
        fig.notes.append(f"killed decode0 (pid {pid}) before its first token")
        heal(cluster, fig, "decode0", t, pid, need_kv=False, seed=12)
    return _in_background(fault)


def _busiest(cluster: UpCluster, role: str) -> str:
    """The worker of ``role`` with the most sequences running now."""
    best, most = f"{role}0", -1.0
    for p in cluster.state().get("processes", []):
        if p["name"].startswith(role):
            try:
                running = _metric(_get(f"{p['address']}/metrics"), "kvrelay_engine_running")
            except OSError:
                continue
            if running > most:
                best, most = p["name"], running
    return best


def kill_decode_midstream(cluster: UpCluster, load: Load, fig: Figures) -> threading.Thread:
    def fault() -> None:
        _after_streaming(load, 3)
        name = _busiest(cluster, "decode")
        pid, t = cluster.kill(name), time.monotonic()
        fig.notes.append(f"killed {name} (pid {pid}), the decode with the most streams, mid-stream")
        heal(cluster, fig, name, t, pid, need_kv=False, seed=13)
    return _in_background(fault)


def kill_store(cluster: UpCluster, load: Load, fig: Figures) -> threading.Thread:
    def fault() -> None:
        _after_streaming(load, 1)
        pid, t_kill = cluster.kill("store"), time.monotonic()
        fig.notes.append(f"killed the store (pid {pid}) mid-transfer; kvrelay up restarts it")
        restarted(cluster, "store", pid)  # the supervisor's restart: a new pid, running
        back = time.monotonic()
        fig.notes.append(f"the store was back {back - t_kill:.1f}s after its kill (supervisor backoff + start-up "
                         f"+ SSD recovery, on cores the engines keep busy recomputing)")
        fig.recovery_s = store_recovery(cluster, back, fig)  # the figure: from its return
    return _in_background(fault)


def drop_connections(cluster: UpCluster, load: Load, fig: Figures) -> threading.Thread:
    def fault() -> None:
        _after_streaming(load, 1)
        port = cluster.process("store")["address"].rsplit(":", 1)[1]  # type: ignore[index]
        r = subprocess.run(["ss", "-K", "dst", "127.0.0.1", "dport", "=", port], capture_output=True, text=True)
        fig.notes.append(f"ss -K: dropped the TCP connections to the store's port {port} (rc {r.returncode})")
        fig.recovery_s = fig.first_answer_s = recovery(cluster, time.monotonic(), need_kv=True, seed=15)
    return _in_background(fault)


def corrupt_pool(cluster: UpCluster, load: Load, fig: Figures) -> threading.Thread:
    def fault() -> None:
        _after_streaming(load, 2)
        mine = f"kvrelay-up-{cluster.proc.pid}"
        pools = [f for f in os.listdir("/dev/shm") if f == mine]  # not its .dir or .owner sidecars
        rng = random.Random(16)
        flipped = 0
        for name in pools:
            path = Path("/dev/shm") / name
            size = path.stat().st_size
            with open(path, "r+b") as f:
                for _ in range(2000):  # scattered bytes over the first 64 MiB, where the live chunks sit
                    f.seek(rng.randrange(0, min(size, 64 << 20)))
                    f.write(bytes([rng.randrange(256)]))
                    flipped += 1
        fig.notes.append(f"overwrote {flipped} random bytes of the store's pool {pools}")
        fig.recovery_s = fig.first_answer_s = recovery(cluster, time.monotonic(), need_kv=False, seed=16)
    return _in_background(fault)


def _note(text: str) -> Scenario:
    def scenario(cluster: UpCluster, load: Load, fig: Figures) -> None:
        fig.notes.append(text)
    return scenario


SCENARIOS: dict[str, tuple[Scenario, dict[str, Any]]] = {
    "no-fault": (_note("the same load with no fault: the baseline for request times"), {}),
    "prefill-kill": (kill_prefill, {}),
    "decode-kill-before-first-token": (kill_decode_early, {}),
    "decode-kill-mid-stream": (kill_decode_midstream, {}),
    "store-kill-and-restart": (kill_store, {}),
    "connection-drop": (drop_connections, {}),
    "pool-corruption": (corrupt_pool, {}),
    "pool-full": (_note("a 4 MiB pool: most publishes are refused"), {"pool_size": "4MiB"}),
    "store-slow": (_note("the store delays every request by 300 ms"),
                   {"store_env": {"KVRELAY_FAULT_STORE_DELAY_MS": "300"}}),
    "client-disconnect": (_note("every client closes its stream after 2 tokens"), {"disconnect_after": 2}),
}
QUICK = ("no-fault", "store-kill-and-restart", "decode-kill-mid-stream")


def run_scenario(name: str, workdir: Path, requests: int = 32, concurrency: int = 16,
                 **cluster_opts: Any) -> Figures:
    scenario, opts = SCENARIOS[name]
    opts = {**opts, **cluster_opts}
    disconnect_after = opts.pop("disconnect_after", 0)
    fig = Figures(name)
    cluster = UpCluster(workdir / name, **opts)
    try:
        warm = Load(cluster, 4, seed=1)
        warm.run(4)
        before = snapshot(cluster)
        load = Load(cluster, requests, seed=hash(name) % 1000)
        injector = scenario(cluster, load, fig)
        fig.outcomes = load.run(concurrency, disconnect_after)
        if injector is not None:  # its recovery probe may still run
            injector.join(90)
        else:  # a standing condition: how long until the cluster answers right once the load is gone
            fig.recovery_s = fig.first_answer_s = recovery(cluster, time.monotonic(), need_kv=False, seed=17)
        # what a fault re-creates once (a restarted peer's connections) is not a leak; what keeps growing is:
        # the same load again, and compare
        again = Load(cluster, requests, seed=hash(name) % 1000 + 1)
        after_fault = snapshot(cluster)
        fig.outcomes += again.run(concurrency, disconnect_after)
        fig.leaks = leaks(cluster, after_fault, before, fig)
        once = {n: after_fault["counts"][n][0] - before["counts"][n][0] for n in after_fault["counts"]
                if n in before["counts"] and before["pids"].get(n) == after_fault["pids"][n]}
        if any(v > 0 for v in once.values()):
            fig.notes.append(f"file descriptors opened once by the fault (not growing after): {once}")
    finally:
        cluster.close()
    return fig


def run(ctx: BenchContext) -> None:
    names = list(QUICK if ctx.quick else SCENARIOS)
    out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kvrelay-bench-faults-") as tmp:
        for name in ctx.steps(names, "scenarios"):
            fig = run_scenario(name, Path(tmp), requests=16 if ctx.quick else 32)
            s = fig.summary()
            out.append(s)
            print(json.dumps(s), file=sys.stderr)
            for metric, target in (("wrong", 0.0), ("hung", 0.0), ("leaks", 0.0)):
                ctx.add(Record.compare(SUITE, name, metric, float(s[metric]), "requests" if metric != "leaks"
                                       else "objects", "target", target, params=s, lower_is_better=True))
            ctx.add(Record.compare(SUITE, name, "correct", float(s["correct"]), "requests", "sent", float(s["sent"]),
                                   params=s))
            ctx.add(Record.compare(SUITE, name, "recovery", s["recovery_s"], "s", "target", RECOVERY_TARGET_S,
                                   params=s, lower_is_better=True))
            if out[0]["scenario"] == "no-fault":  # the same load's slowest request without a fault
                ctx.add(Record.compare(SUITE, name, "slowest_request", s["max_request_s"], "s", "no-fault",
                                       out[0]["max_request_s"], params=s, lower_is_better=True))
            # a request sent right after the fault queues behind the load: set beside the load's slowest request
            ctx.add(Record.compare(SUITE, name, "first_answer_after_fault", s["first_answer_s"], "s",
                                   "slowest request of the load", s["max_request_s"], params=s, lower_is_better=True))
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    (ctx.out_dir / "faults.json").write_text(json.dumps(out, indent=1))
