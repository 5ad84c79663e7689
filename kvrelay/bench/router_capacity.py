"""The capacity case of `kvrelay bench router`: how many requests a second one router core carries.

Two fake workers (kvrelay.bench.fakeworker: a fixed 16-event answer, not an engine) stand behind the router;
the load generator (kvrelay.bench.loadgen, its own process pinned to core 0) sends the same streaming
requests through the router (both legs; 1 and 2 router processes, ``--workers``) and, as the baseline,
straight to the fake decode worker.  Figures: requests/s, and the router's own CPU time per request (user +
system, from /proc, summed over its processes), whose inverse is what one router core carries (target:
3,000 requests/s, 0.33 ms).  CPU time, not wall time, so that the load generator and the fake workers
sharing the cores do not blur it.  Every streamed answer is checked against the fake worker's 16 events.

`kvrelay bench router` runs `capacity` among its cases (over its own cluster's fake workers);
`kvrelay bench router_capacity` runs it alone: it starts only the two fake workers and the routers.

Owns: the capacity case.  Must not touch: the router or the fake worker (it starts them as processes), the
routing and overhead cases (router.py).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Protocol

from kvrelay import proc
from kvrelay.bench.harness import BenchContext, Record
from kvrelay.bench.loadgen import load
from kvrelay.proc import cpu_seconds

SUITE = "router"
CHUNKS = 16  # the fake worker's answer: events "t0 " .. "t15 "
STREAMS = 64


class Starter(Protocol):
    def start(self, name: str, argv: list[str]) -> dict:
        """Start ``python ARGV --ready-file F`` as process ``name``; its ready file, with its ``pid``."""
        ...


def router_argv(prefill: str, decode: str, workers: int) -> list[str]:
    return ["-m", "kvrelay.cli", "router", "--port", "0", "--log-level", "WARNING", "--prefill", prefill, "--decode",
            decode, "--workers", str(workers)]


def capacity(ctx: BenchContext, procs: Starter, fake_prefill: str, fake_decode: dict) -> None:
    """The capacity records, through routers ``procs`` starts over the fake workers at ``fake_prefill`` (a URL)
    and ``fake_decode`` (its ready file: ``url``, ``pid``)."""
    n = 150 if ctx.quick else 4000
    bodies = [{"prompt": f"request {i}", "max_tokens": CHUNKS} for i in range(n)]
    expect = "".join(f"t{i} " for i in range(CHUNKS))
    dec = fake_decode
    load([dec["url"]], bodies[:20], STREAMS)  # warm-up
    cpu0 = cpu_seconds(dec["pid"])
    direct = load([dec["url"]], bodies, STREAMS)
    dec_cpu = (cpu_seconds(dec["pid"]) - cpu0) / n
    for workers in (1, 2):
        router = procs.start(f"router_capacity_{workers}", router_argv(fake_prefill, dec["url"], workers))
        pids = router.get("workers", [router["pid"]])
        load([router["url"]], bodies[:20], STREAMS)
        cpu0 = sum(cpu_seconds(pid) for pid in pids)
        via = load([router["url"]], bodies, STREAMS)
        r_cpu = (sum(cpu_seconds(pid) for pid in pids) - cpu0) / n
        if any(r["text"] != expect for r in via["results"] + direct["results"]):
            raise RuntimeError(f"a streamed answer was not the fake worker's {CHUNKS} events")
        case = f"capacity/{workers}_router_process{'es' if workers > 1 else ''}"
        params = {"streams": STREAMS, "requests": n, "chunks": CHUNKS, "cores": os.cpu_count()}
        ctx.add(Record.compare(SUITE, case, "requests_per_s", n / via["wall"], "req/s",
                               "direct to the fake decode worker", n / direct["wall"], params))
        ctx.add(Record.compare(SUITE, case, "router_cpu_ms_per_request", r_cpu * 1000, "ms",
                               "the fake worker's cpu ms per request", dec_cpu * 1000, params, lower_is_better=True))
        ctx.add(Record.compare(SUITE, case, "requests_per_s_per_router_core", 1 / r_cpu, "req/s", "target",
                               3000.0, params))


class _Children:
    """The standalone run's processes, stopped (SIGTERM, then SIGKILL) when the stack closes."""

    def __init__(self, stack: ExitStack, workdir: Path) -> None:
        self.workdir, self.children = workdir, list[proc.ChildProcess]()
        stack.callback(lambda: proc.stop_all(self.children, 10.0))

    def start(self, name: str, argv: list[str]) -> dict:
        ready = self.workdir / f"{name}.json"
        child = proc.spawn([sys.executable, *argv, "--ready-file", str(ready)], name=name, ready_file=ready,
                           log=self.workdir / f"{name}.log", session=True)
        self.children.append(child)
        return {**child.wait_ready(120.0), "pid": child.pid}


def run(ctx: BenchContext) -> list[Record]:
    """The capacity case alone (`kvrelay bench router_capacity`)."""
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="kvrelay-bench-capacity-") as tmp:
        procs = _Children(stack, Path(tmp))
        fakes = [procs.start(f"fake_{role}", ["-m", "kvrelay.bench.fakeworker"]) for role in ("prefill", "decode")]
        t0 = time.monotonic()
        capacity(ctx, procs, fakes[0]["url"], fakes[1])
        print(f"router bench: capacity took {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return ctx.records
