"""`kvrelay bench vllm`: its record and chart path on synthetic samples (fast, no vLLM), and the whole quick
suite on live vLLM servers (opt-in: ``KVRELAY_BENCH_VLLM=1 python -m pytest bench/test_bench_vllm.py``; it
starts eight vLLM servers, three at most at once, and takes 10-15 minutes on 2 cores)."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest

from kvrelay.bench import vllm as suite
from kvrelay.bench.harness import BenchContext
from kvrelay.bench.suites import run_suite


def _s(ttft: float, itl: float = 0.016, end: float | None = None) -> dict[str, float]:
    s = {"ttft": ttft, "itl": itl}
    if end is not None:
        s["prefill_end_to_first_token"] = end
    return s


def test_records_and_chart_from_samples(tmp_path):
    ctx = BenchContext(suite="vllm", quick=True, progress=False, out_dir=tmp_path)
    col = [_s(0.100), _s(0.110), _s(0.105)]
    results = {"kvrelay-shm": {1000: [_s(0.104, end=0.010)] * 3}, "nixlconnector": {1000: [_s(0.130, end=0.040)] * 3},
               "prefix-hit": {2000: [_s(0.050)] * 3}}
    base = {"kvrelay-shm": {1000: col}, "nixlconnector": {1000: col}, "prefix-hit": {2000: [_s(0.200)] * 3}}
    suite._records(ctx, results, base, {}, reps=3)
    suite._plot(ctx, results, base)
    by = {(r.case, r.metric, r.baseline): r for r in ctx.records}
    r = by[("kvrelay-shm/1000tok", "ttft", "colocated")]
    assert r.value == pytest.approx(104) and r.baseline_value == pytest.approx(105)
    assert r.ratio == pytest.approx(105 / 104)  # lower is better: baseline / value
    assert by[("kvrelay-shm/1000tok", "ttft", "nixlconnector")].baseline_value == pytest.approx(130)
    end = by[("nixlconnector/1000tok", "prefill_end_to_first_token", "one decode step (colocated itl)")]
    assert end.value == pytest.approx(40) and end.baseline_value == pytest.approx(16)
    hit = by[("prefix-hit/2000tok", "ttft", "recompute (fresh prompt, same server)")]
    assert hit.ratio == pytest.approx(4.0)
    assert all(math.isfinite(r.ratio) for r in ctx.records)
    assert (tmp_path / "vllm.png").stat().st_size > 10_000


@pytest.mark.slow  # 8 vLLM servers
@pytest.mark.timeout(2400)
@pytest.mark.skipif(not os.environ.get("KVRELAY_BENCH_VLLM"), reason="starts 8 vLLM servers (10-15 min): set "
                    "KVRELAY_BENCH_VLLM=1 to run it")
def test_vllm_suite_quick(tmp_path):
    if importlib.util.find_spec("vllm.entrypoints.openai.api_server") is None:
        pytest.skip("vLLM is not installed (pip install -e '.[vllm]')")
    records = run_suite("vllm", quick=True, progress=False, out_dir=tmp_path)
    cases = {r.case.split("/")[0] for r in records}
    assert {"kvrelay-shm", "kvrelay-tcp", "nixlconnector", "prefix-hit"} <= cases, cases
    for r in records:
        assert r.value > 0 and r.baseline_value > 0 and math.isfinite(r.ratio), r
    assert (tmp_path / "vllm.png").stat().st_size > 10_000
