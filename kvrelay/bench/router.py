"""`kvrelay bench router`: the router's added latency, its capacity, and its routing quality per policy.

Every load comes from `kvrelay.bench.loadgen` (aiohttp, streaming), a process of its own pinned to core 0;
every figure is set beside a baseline measured in the same run.  One cluster serves every case: a store,
2 prefill and 2 decode reference engines (a small seeded random model), and two fake workers:
  capacity  the fake workers (kvrelay.bench.fakeworker: a fixed 16-event answer) through the router (both
            legs; 1 and 2 router processes) against the same fake decode worker served directly:
            requests/s, and the router's own CPU time per request (from /proc), whose inverse is what one
            router core carries (router_capacity.py; `kvrelay bench router_capacity` runs it alone).
  overhead  client -> router -> the decode engines against client -> the same engines, at 1, 64 and 256
            streams (the router sends each request to a decode engine alone, so the engines do the same
            work both ways): added p50/p99 latency in ms.
  routing   three workloads (shared prefix, unique prompts, one hot prefix) through the router over the
            whole cluster, R times per policy (router_routing.py): TTFT p50/p99 and requests/s against round
            robin (and least_loaded), medians with their spreads.  The engines publish KV events, which
            cache_aware follows.
Every answer is checked: through the router it must equal the engine's own answer to the same prompt
(greedy), and every request must complete.  ``--quick`` (CI): few requests, short prompts; a test checks the
records' structure and the answers, not the timings.  On a shared 2-core machine timings are noisy: compare
ratios within one run.

Owns: the router suite.  Must not touch: the router or the engines (it starts them as processes).
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kvrelay import proc
from kvrelay.bench import router_capacity, router_routing
from kvrelay.bench.harness import BenchContext, Record, percentile
from kvrelay.bench.loadgen import load  # pinned to LOADGEN_CORE (0) by default
from kvrelay.store.pool import unlink_pool

SUITE = "router"
LOADGEN_CORE = 0
POLICIES = ("round_robin", "least_loaded", "cache_aware")
ENGINE = ["--vocab-size", "4096", "--threads", "1", "--seed", "7", "--max-model-len", "4096"]


class Procs:
    """The suite's processes: started with a ready file (kvrelay.proc), stopped (SIGTERM, then SIGKILL) at the end."""

    def __init__(self, stack: ExitStack, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[proc.ChildProcess] = []
        self.after: list[Callable[[], None]] = []  # called once every process stopped
        stack.callback(self.stop)

    def spawn(self, name: str, argv: list[str]) -> proc.ChildProcess:
        ready = self.workdir / f"{name}.json"
        child = proc.spawn([sys.executable, *argv, "--ready-file", str(ready)], name=name, ready_file=ready,
                           log=self.workdir / f"{name}.log", session=True)
        self.procs.append(child)
        return child

    def wait(self, child: proc.ChildProcess, timeout: float = 300.0) -> dict:
        """Its ready file, with its pid; a StartError (naming its log, quoting its tail) if it does not come."""
        return {**child.wait_ready(timeout), "pid": child.pid}

    def start(self, name: str, argv: list[str]) -> dict:
        return self.wait(self.spawn(name, argv))

    def stop(self) -> None:
        proc.stop_all(self.procs, 10.0)
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
    events: list[str]  # each engine's KV events for the router: URL=PUB,REPLAY


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
    common = ["--port", "0", "--store", store, "--transport", "shm", *ENGINE, "--num-layers", "2" if quick else "4",
              "--events", "tcp://127.0.0.1:0"]
    # prefill engines hold about three system prompts of the full workload each (the cache has to be used well)
    engines = [procs.spawn(f"prefill{i}", kvrelay("engine", "--role", "prefill", *common, "--num-blocks", "320"))
               for i in range(2)]
    engines += [procs.spawn(f"decode{i}", kvrelay("engine", "--role", "decode", *common)) for i in range(2)]
    ready = [procs.wait(e) for e in engines]
    urls = [r["url"] for r in ready]
    events = [f"{r['url']}={r['events']},{r['events_replay']}" for r in ready]
    return Cluster(store, urls[:2], urls[2:], procs.wait(fakes[0])["url"], procs.wait(fakes[1]), events)


def check_same(got: dict, want: dict, what: str) -> None:
    wrong = [i for i, (a, b) in enumerate(zip(got["results"], want["results"], strict=True)) if a["text"] != b["text"]]
    if wrong:
        raise RuntimeError(f"{what}: {len(wrong)} answers differ from the engines' own, e.g. request {wrong[0]}: "
                           f"{got['results'][wrong[0]]['text']!r} != {want['results'][wrong[0]]['text']!r}")


def _ms(xs: list[float], p: float) -> float:
    return percentile(xs, p) * 1000


def capacity(ctx: BenchContext, procs: Procs, cl: Cluster) -> None:
    router_capacity.capacity(ctx, procs, cl.fake_prefill, cl.fake_decode)  # the case lives there


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


def routing(ctx: BenchContext, procs: Procs, cl: Cluster) -> None:
    router_routing.routing(ctx, lambda name, extra: procs.start(name, router_args(
        cl.prefill, cl.decode, "--store", cl.store, *extra))["url"], cl.decode, cl.events)  # the case lives there


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
