"""The benchmark harness: what every suite of `kvrelay bench` (suites.py) builds on.

Owns: the record format, the run context (progress display, quick mode, timing helpers) and the table.
Each suite is a module `kvrelay.bench.<suite>` exposing ``run(ctx: BenchContext) -> list[Record]``; every
figure is set beside a baseline measured in the same run (``ratio`` = value / baseline_value, so higher
is better for throughputs; suites say in ``unit`` what they measure).  Must not touch: what the suites
measure, the command line (suites.py).
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import msgspec

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
    # over repeats (Record.compare_repeats): value and baseline_value are medians, ratio the median of the
    # per-repeat ratios, ratio_min/ratio_max their spread; a single measurement leaves them None and 1
    ratio_min: float | None = None
    ratio_max: float | None = None
    repeats: int = 1

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

    @classmethod
    def compare_repeats(cls, suite: str, case: str, metric: str, values: list[float], unit: str, baseline: str,
                        baseline_values: list[float], params: dict | None = None,
                        lower_is_better: bool = False) -> "Record":
        """A figure beside its baseline over paired repeats (repeat i of each measured together): the medians,
        the median of the per-repeat ratios, and their min and max."""
        if not values or len(values) != len(baseline_values):
            raise ValueError(f"{suite}/{case}: {len(values)} repeats of the figure against {len(baseline_values)} "
                             f"of its baseline; need the same number, at least one")
        ratios = [cls.compare(suite, case, metric, v, unit, baseline, b, None, lower_is_better).ratio
                  for v, b in zip(values, baseline_values, strict=True)]
        return cls(suite=suite, case=case, metric=metric, value=median(values), unit=unit, baseline=baseline,
                   baseline_value=median(baseline_values), ratio=median(ratios), params=params or {},
                   ratio_min=min(ratios), ratio_max=max(ratios), repeats=len(ratios))


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
    rows = [("suite", "case", "metric", "value", "unit", "baseline", "baseline_value", "ratio", "ratio min-max (n)")]
    for r in records:
        spread = "" if r.ratio_min is None or r.ratio_max is None else \
            f"{r.ratio_min:.3f}-{r.ratio_max:.3f} ({r.repeats})"
        rows.append((r.suite, r.case, r.metric, f"{r.value:.4g}", r.unit, r.baseline, f"{r.baseline_value:.4g}",
                     f"{r.ratio:.3f}", spread))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)
