"""One fault scenario from start to figures, and the `kvrelay bench faults` suite over all of them.

Owns: `run_scenario` (start the cluster, warm it, baseline, the faulted round, recovery, a second round,
leaks) and `run` (the suite: its records against their targets, faults.json).  Must not touch: the faults
themselves (scenarios.py) or the cluster's processes.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kvrelay.bench.faults.cluster import UpCluster
from kvrelay.bench.faults.figures import Figures, Outcome
from kvrelay.bench.faults.holdings import ABORT_RELEASE_S, StoreWatch, check_release
from kvrelay.bench.faults.leaks import leaks, snapshot
from kvrelay.bench.faults.load import Load
from kvrelay.bench.faults.recovery import recovery
from kvrelay.bench.faults.scenarios import QUICK, SCENARIOS
from kvrelay.bench.harness import BenchContext, Record

SUITE = "faults"
RECOVERY_TARGET_S = 5.0


def _round(load: Load, concurrency: int, leaving: dict[str, Any], watch: StoreWatch | None, fig: Figures,
           label: str, inject=None) -> tuple[list[Outcome], Any]:
    """One round of the load (``inject()`` starts the fault just before it); with ``watch``, the store's
    pins and reserved bytes are checked against their values before the round once it has ended."""
    prior = watch.latest() if watch is not None else None
    started = time.monotonic()
    injector = inject() if inject is not None else None
    outcomes = load.run(concurrency, **leaving)
    if watch is not None and prior is not None:
        check_release(watch, prior, started, outcomes, fig, label)
    return outcomes, injector


def run_scenario(name: str, workdir: Path, requests: int = 32, concurrency: int = 16,
                 **cluster_opts: Any) -> Figures:
    scenario, opts = SCENARIOS[name]
    opts = {**opts, **cluster_opts}
    leaving: dict[str, Any] = {k: opts.pop(k) for k in ("disconnect_after", "leave_after_s") if k in opts}
    watch_store = opts.pop("watch_store", False)
    fig = Figures(name)
    cluster = UpCluster(workdir / name, **opts)
    watch: StoreWatch | None = None
    try:
        warm = Load(cluster, 4, seed=1)
        warm.run(4)
        before = snapshot(cluster)
        load = Load(cluster, requests, seed=hash(name) % 1000)
        if watch_store:
            watch = StoreWatch(cluster.store_metrics_url()).start()
        fig.outcomes, injector = _round(load, concurrency, leaving, watch, fig, "the faulted round",
                                        lambda: scenario(cluster, load, fig))
        if injector is not None:  # its recovery probe may still run
            injector.join(90)
        else:  # a standing condition: how long until the cluster answers right once the load is gone
            fig.recovery_s = fig.first_answer_s = recovery(cluster, time.monotonic(), need_kv=False, seed=17)
        # what a fault re-creates once (a restarted peer's connections) is not a leak; what keeps growing is:
        # the same load again, and compare
        again = Load(cluster, requests, seed=hash(name) % 1000 + 1)
        after_fault = snapshot(cluster)
        more, _ = _round(again, concurrency, leaving, watch, fig, "the round after")
        fig.outcomes += more
        fig.leaks.update(leaks(cluster, after_fault, before, fig))
        once = {n: after_fault["counts"][n][0] - before["counts"][n][0] for n in after_fault["counts"]
                if n in before["counts"] and before["pids"].get(n) == after_fault["pids"][n]}
        if any(v > 0 for v in once.values()):
            fig.notes.append(f"file descriptors opened once by the fault (not growing after): {once}")
    finally:
        if watch is not None:
            watch.stop()
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
            if "store_release_s" in s:  # the slowest round's release of pins and reserved bytes after its aborts
                ctx.add(Record.compare(SUITE, name, "store_release_after_abort", max(s["store_release_s"]), "s",
                                       "target", ABORT_RELEASE_S, params=s, lower_is_better=True))
            if out[0]["scenario"] == "no-fault":  # the same load's slowest request without a fault
                ctx.add(Record.compare(SUITE, name, "slowest_request", s["max_request_s"], "s", "no-fault",
                                       out[0]["max_request_s"], params=s, lower_is_better=True))
            # a request sent right after the fault queues behind the load: set beside the load's slowest request
            ctx.add(Record.compare(SUITE, name, "first_answer_after_fault", s["first_answer_s"], "s",
                                   "slowest request of the load", s["max_request_s"], params=s, lower_is_better=True))
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    (ctx.out_dir / "faults.json").write_text(json.dumps(out, indent=1))
