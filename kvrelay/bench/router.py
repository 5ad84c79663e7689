"""`kvrelay bench router`: the router's added latency, its capacity, and its routing quality per policy.

Every load comes from `kvrelay.bench.loadgen` (aiohttp, streaming), a process of its own pinned to core 0;
every figure is set beside a baseline measured in the same run.  One cluster serves every case: a store,
2 prefill and 2 decode reference engines (a small seeded random model), and two fake workers:
  capacity  the fake workers (kvrelay.bench.fakeworker: a fixed 16-event answer) through the router (both
            legs; 1 and 2 router processes) against the same fake decode worker served directly:
            requests/s, and the router's own CPU time per request (from /proc), whose inverse is what one
            router core carries.
  overhead  client -> router -> the decode engines against client -> the same engines, at 1, 64 and 256
            streams (the router sends each request to a decode engine alone, so the engines do the same
            work both ways): added p50/p99 latency in ms.
  routing   a shared-prefix workload (a few long system prompts, many users, several turns each) through
            the router over the whole cluster, once per policy (each with its own, equally shaped, prompts:
            no policy inherits another's warm caches): TTFT p50/p99 and requests/s against round robin.
Every answer is checked: through the router it must equal the engine's own answer to the same prompt
(greedy), and every request must complete.  ``--quick`` (CI): few requests, short prompts; a test checks the
records' structure and the answers, not the timings.  On a shared 2-core machine timings are noisy: compare
ratios within one run.

Owns: the router suite.  Must not touch: the router or the engines (it starts them as processes).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kvrelay.bench.harness import BenchContext, Record, percentile
from kvrelay.readyfile import wait_ready_file
from kvrelay.store.pool import unlink_pool

SUITE = "router"
LOADGEN_CORE = 0
POLICIES = ("round_robin", "least_loaded", "cache_aware")
ENGINE = ["--vocab-size", "4096", "--threads", "1", "--seed", "7", "--max-model-len", "4096"]


class Procs:
    """The suite's processes: started with a ready file, stopped (SIGTERM, then SIGKILL) at the end."""

    def __init__(self, stack: ExitStack, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []
        self.after: list[Callable[[], None]] = []  # called once every process stopped
        stack.callback(self.stop)

    def spawn(self, name: str, argv: list[str]) -> tuple[str, subprocess.Popen]:
        ready = self.workdir / f"{name}.json"
        ready.unlink(missing_ok=True)
        with open(self.workdir / f"{name}.log", "wb") as log:
            p = subprocess.Popen([sys.executable, *argv, "--ready-file", str(ready)], stdout=log,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(p)
        return name, p

    def wait(self, started: tuple[str, subprocess.Popen], timeout: float = 300.0) -> dict:
        name, p = started
        try:
            info = wait_ready_file(self.workdir / f"{name}.json", p, timeout)
        except (ChildProcessError, TimeoutError) as exc:
            tail = (self.workdir / f"{name}.log").read_text(errors="replace")[-1500:]
            raise RuntimeError(f"{name} did not start: {exc}\n{tail}") from None
        return {**info, "pid": p.pid}

    def start(self, name: str, argv: list[str]) -> dict:
        return self.wait(self.spawn(name, argv))

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []
        for fn in self.after:
            fn()


@dataclass
class Cluster:
    store: str
    prefill: list[str]
    decode: list[str]
    fake_prefill: str
    fake_decode: dict


def kvrelay(*args: str) -> list[str]:
    return ["-m", "kvrelay.cli", *args]


def router_args(prefill: list[str], decode: list[str], *extra: str) -> list[str]:
    args = ["router", "--port", "0", "--log-level", "WARNING", *extra]
    for u in prefill:
        args += ["--prefill", u]
    for u in decode:
        args += ["--decode", u]
    return kvrelay(*args)


def start_cluster(procs: Procs, quick: bool) -> Cluster:
    pool = f"kvrelay-bench-router-{os.getpid()}"
    procs.after.append(lambda: unlink_pool(pool))
    fakes = [procs.spawn(f"fake_{role}", ["-m", "kvrelay.bench.fakeworker"]) for role in ("prefill", "decode")]
    store = procs.start("store", kvrelay("store", "--port", "0", "--metrics-port", "0", "--pool-size", "1GiB",
                                         "--pool-name", pool, "--transports", "shm,tcp"))["address"]
    common = ["--port", "0", "--store", store, "--transport", "shm", *ENGINE, "--num-layers", "2" if quick else "4"]
    # prefill engines hold about three system prompts of the full workload each (the cache has to be used well)
    engines = [procs.spawn(f"prefill{i}", kvrelay("engine", "--role", "prefill", *common, "--num-blocks", "320"))
               for i in range(2)]
    engines += [procs.spawn(f"decode{i}", kvrelay("engine", "--role", "decode", *common)) for i in range(2)]
    urls = [procs.wait(e)["url"] for e in engines]
    return Cluster(store, urls[:2], urls[2:], procs.wait(fakes[0])["url"], procs.wait(fakes[1]))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(urls: list[str], bodies: list[dict], concurrency: int) -> dict:
    """Run the load generator (its own process, pinned to LOADGEN_CORE); every request must complete."""
    spec = {"urls": urls, "bodies": bodies, "concurrency": concurrency, "core": LOADGEN_CORE, "timeout": 600.0}
    out = subprocess.run([sys.executable, "-m", "kvrelay.bench.loadgen"], input=json.dumps(spec).encode(),
                         capture_output=True, timeout=900)
    if out.returncode:
        raise RuntimeError(f"the load generator failed: {out.stderr.decode()[-2000:]}")
    res = json.loads(out.stdout)
    failed = [r for r in res["results"] if not r.get("ok")]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(bodies)} requests to {urls} failed, e.g. {failed[0]}")
    return res


def check_same(got: dict, want: dict, what: str) -> None:
    wrong = [i for i, (a, b) in enumerate(zip(got["results"], want["results"], strict=True)) if a["text"] != b["text"]]
    if wrong:
        raise RuntimeError(f"{what}: {len(wrong)} answers differ from the engines' own, e.g. request {wrong[0]}: "
                           f"{got['results'][wrong[0]]['text']!r} != {want['results'][wrong[0]]['text']!r}")


def _ms(xs: list[float], p: float) -> float:
    return percentile(xs, p) * 1000


def capacity(ctx: BenchContext, procs: Procs, cl: Cluster) -> None:
    n, streams = (150, 64) if ctx.quick else (4000, 64)
    bodies = [{"prompt": f"request {i}", "max_tokens": 16} for i in range(n)]
    expect = "".join(f"t{i} " for i in range(16))
    dec = cl.fake_decode
    load([dec["url"]], bodies[:20], streams)  # warm-up
    cpu0 = cpu_seconds(dec["pid"])
    direct = load([dec["url"]], bodies, streams)
    dec_cpu = (cpu_seconds(dec["pid"]) - cpu0) / n
    for workers in (1, 2):
        router = procs.start(f"router_capacity_{workers}", router_args([cl.fake_prefill], [dec["url"]], "--workers",
                                                                        str(workers)))
        pids = router.get("workers", [router["pid"]])
        load([router["url"]], bodies[:20], streams)
        cpu0 = sum(cpu_seconds(pid) for pid in pids)
        via = load([router["url"]], bodies, streams)
        r_cpu = (sum(cpu_seconds(pid) for pid in pids) - cpu0) / n
        if any(r["text"] != expect for r in via["results"] + direct["results"]):
            raise RuntimeError("a streamed answer was not the fake worker's 16 events")
        case = f"capacity/{workers}_router_process{'es' if workers > 1 else ''}"
        params = {"streams": streams, "requests": n, "chunks": 16, "cores": os.cpu_count()}
        ctx.add(Record.compare(SUITE, case, "requests_per_s", n / via["wall"], "req/s",
                               "direct to the fake decode worker", n / direct["wall"], params))
        ctx.add(Record.compare(SUITE, case, "router_cpu_ms_per_request", r_cpu * 1000, "ms",
                               "the fake worker's cpu ms per request", dec_cpu * 1000, params, lower_is_better=True))
        ctx.add(Record.compare(SUITE, case, "requests_per_s_per_router_core", 1 / r_cpu, "req/s", "target",
                               3000.0, params))


def overhead(ctx: BenchContext, procs: Procs, cl: Cluster) -> None:
    # the router sends every request to a decode engine alone: the engines do the same work both ways
    router = procs.start("router_overhead", router_args(cl.prefill, cl.decode, "--decode-only-below",
                                                        str(10**9)))["url"]
    rng = random.Random(1)
    for streams in (1, 64, 256):
        n = {1: 4, 64: 64, 256: 256}[streams] if ctx.quick else {1: 100, 64: 640, 256: 1024}[streams]
        # shorter than an engine block (16): the router's run cannot hit the prefix cache the direct run filled
        tokens, max_tokens = (12, 2) if ctx.quick else (12, 4)
        bodies = [{"prompt": [rng.randrange(256, 4096) for _ in range(tokens)], "max_tokens": max_tokens,
                   "temperature": 0.0, "ignore_eos": True} for _ in range(n)]
        direct = load(cl.decode, bodies, streams)  # split over the same two engines
        via = load([router], bodies, streams)
        check_same(via, direct, f"overhead at {streams} streams")
        base = [r["total"] for r in direct["results"]]
        got = [r["total"] for r in via["results"]]
        params = {"streams": streams, "requests": n, "prompt_tokens": tokens, "max_tokens": max_tokens}
        case = f"overhead/{streams}_streams"
        for p in (50, 99):
            ctx.add(Record(suite=SUITE, case=case, metric=f"added_p{p}_ms", value=_ms(got, p) - _ms(base, p),
                           unit="ms", baseline=f"direct p{p}", baseline_value=_ms(base, p),
                           ratio=_ms(got, p) / max(_ms(base, p), 1e-9), params=params))
        ctx.add(Record.compare(SUITE, case, "completed", float(len(got)), "requests", "sent", float(n), params))


def workload(seed: int, quick: bool) -> list[list[dict]]:
    """Waves of requests: turn t of every user, sent together; each turn extends the user's history."""
    systems, users, turns, sys_len = (2, 4, 2, 128) if quick else (4, 16, 3, 1536)
    rng = random.Random(seed)
    prefixes = [[rng.randrange(256, 4096) for _ in range(sys_len)] for _ in range(systems)]
    history = {u: list(prefixes[u % systems]) for u in range(users)}
    waves = []
    for _ in range(turns):
        for u in range(users):
            history[u] = history[u] + [rng.randrange(256, 4096) for _ in range(64)]
        waves.append([{"prompt": list(history[u]), "max_tokens": 4, "temperature": 0.0, "ignore_eos": True}
                      for u in range(users)])
    return waves


def routing(ctx: BenchContext, procs: Procs, cl: Cluster) -> None:
    results: dict[str, tuple[list[float], float, int]] = {}
    answers: list[tuple[str, list[dict], dict]] = []
    for k, policy in enumerate(POLICIES):
        router = procs.start(f"router_{policy}", router_args(cl.prefill, cl.decode, "--policy", policy, "--store",
                                                              cl.store))
        ttft, wall, n = [], 0.0, 0
        for wave in workload(100 + k, ctx.quick):
            res = load([router["url"]], wave, len(wave))
            answers.append((policy, wave, res))
            ttft += [r["ttft"] for r in res["results"]]
            wall += res["wall"]
            n += len(wave)
        results[policy] = (ttft, wall, n)
    # after every policy ran (these direct runs warm no cache a policy used), all at once
    bodies = [b for _, wave, _ in answers for b in wave]
    direct = load(cl.decode, bodies, max(len(w) for _, w, _ in answers))["results"]
    for policy, wave, res in answers:
        check_same(res, {"results": direct[:len(wave)]}, f"routing with {policy}")
        direct = direct[len(wave):]
    base_ttft, base_wall, base_n = results["round_robin"]
    for policy, (ttft, wall, n) in results.items():
        params = {"requests": n, "quick": ctx.quick}
        for p in (50, 99):
            ctx.add(Record.compare(SUITE, f"routing/{policy}", f"ttft_p{p}_ms", _ms(ttft, p), "ms",
                                   f"round_robin p{p}", _ms(base_ttft, p), params, lower_is_better=True))
        ctx.add(Record.compare(SUITE, f"routing/{policy}", "requests_per_s", n / wall, "req/s", "round_robin",
                               base_n / base_wall, params))


def run(ctx: BenchContext) -> list[Record]:
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="kvrelay-bench-router-") as tmp:
        procs = Procs(stack, Path(tmp))
        t0 = time.monotonic()
        cl = start_cluster(procs, ctx.quick)
        print(f"router bench: cluster up in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        for name, case in ctx.steps([("capacity", capacity), ("overhead", overhead), ("routing", routing)],
                                    "cases"):
            t0 = time.monotonic()
            case(ctx, procs, cl)
            print(f"router bench: {name} took {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return ctx.records
