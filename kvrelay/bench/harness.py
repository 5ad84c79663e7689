"""The benchmark harness: `kvrelay bench <suite> [--quick] [--json FILE]`.

Owns: the record format, the run context (progress display, quick mode, timing helpers) and the
command line.  Each suite is a module `kvrelay.bench.<suite>` exposing ``run(ctx: BenchContext) ->
list[Record]``; every figure is set beside a baseline measured in the same run (``ratio`` = value /
baseline_value, so higher is better for throughputs; suites say in ``unit`` what they measure).
Must not touch: what the suites measure.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import msgspec

SUITES = ("kernels", "transports", "store", "pd", "vllm", "faults", "router", "hosts", "atrest", "auth")


class Record(msgspec.Struct, kw_only=True):
    suite: str
    case: str
    metric: str
    value: float
    unit: str
    baseline: str
    baseline_value: float
    ratio: float
    params: dict = {}

    @classmethod
    def compare(cls, suite: str, case: str, metric: str, value: float, unit: str, baseline: str,
                baseline_value: float, params: dict | None = None, lower_is_better: bool = False) -> "Record":
        """A figure beside its baseline; ratio is value/baseline (baseline/value when lower is better)."""
        if lower_is_better:
            ratio = baseline_value / value if value else float("inf")
        else:
            ratio = value / baseline_value if baseline_value else float("inf")
        return cls(suite=suite, case=case, metric=metric, value=value, unit=unit, baseline=baseline,
                   baseline_value=baseline_value, ratio=ratio, params=params or {})


@dataclass
class BenchContext:
    suite: str
    quick: bool = False
    progress: bool = True
    out_dir: Path = Path("bench/results")
    records: list[Record] = field(default_factory=list)

    def steps(self, items: Iterable, desc: str, total: int | None = None):
        """Iterate with a progress bar (tqdm, on stderr) when progress is on."""
        if not self.progress:
            return items
        from tqdm import tqdm
        return tqdm(items, desc=f"{self.suite}: {desc}", total=total, file=sys.stderr, leave=False)

    def add(self, record: Record) -> Record:
        self.records.append(record)
        return record


def time_it(fn: Callable[[], object], repeat: int = 5, warmup: int = 1, min_time: float = 0.0) -> list[float]:
    """Wall times (seconds) of ``repeat`` calls after ``warmup`` calls; keeps going until ``min_time``."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def percentile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    if not s:
        raise ValueError("percentile of no samples")
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def format_table(records: list[Record]) -> str:
    rows = [("suite", "case", "metric", "value", "unit", "baseline", "baseline_value", "ratio")]
    for r in records:
        rows.append((r.suite, r.case, r.metric, f"{r.value:.4g}", r.unit, r.baseline, f"{r.baseline_value:.4g}",
                     f"{r.ratio:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)


def run_suite(name: str, quick: bool = False, progress: bool = True, out_dir: Path | None = None) -> list[Record]:
    if name not in SUITES:
        raise ValueError(f"unknown benchmark suite {name!r}; choose one of {', '.join(SUITES)}")
    module = importlib.import_module(f"kvrelay.bench.{name}")
    ctx = BenchContext(suite=name, quick=quick, progress=progress, out_dir=out_dir or Path("bench/results"))
    module.run(ctx)
    return ctx.records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvrelay bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", choices=SUITES + ("all",))
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (CI, smoke runs)")
    parser.add_argument("--json", metavar="FILE", help="write the records as a JSON list to FILE")
    parser.add_argument("--out-dir", default="bench/results", help="where plots and other outputs go")
    parser.add_argument("--no-progress", action="store_true", help="no progress display")
    args = parser.parse_args(argv)
    names = SUITES if args.suite == "all" else (args.suite,)
    records: list[Record] = []
    for name in names:
        records += run_suite(name, quick=args.quick, progress=not args.no_progress, out_dir=Path(args.out_dir))
    print(format_table(records))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_bytes(msgspec.json.format(msgspec.json.encode(records)))
        print(f"wrote {len(records)} records to {args.json}", file=sys.stderr)
    return 0
