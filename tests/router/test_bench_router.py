"""`kvrelay bench router --quick`: every case runs, every request completes with the engines' own answer
(the suite raises otherwise), and the report has its structure.  Timings are not checked here."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # starts several processes: not in the fast tier (-m 'not slow')


@pytest.mark.timeout(600)
def test_quick_router_bench_reports_every_case(tmp_path):
    out = tmp_path / "router.json"
    run = subprocess.run([sys.executable, "-m", "kvrelay.cli", "bench", "router", "--quick", "--no-progress",
                          "--json", str(out)], capture_output=True, text=True, timeout=580)
    assert run.returncode == 0, run.stderr[-3000:]
    records = json.loads(out.read_text())
    got = {(r["case"], r["metric"]) for r in records}
    want = set()
    for w in ("1_router_process", "2_router_processes"):
        want |= {(f"capacity/{w}", m) for m in ("requests_per_s", "router_cpu_ms_per_request",
                                                "requests_per_s_per_router_core")}
    for s in (1, 64, 256):
        want |= {(f"overhead/{s}_streams", m) for m in ("added_p50_ms", "added_p99_ms", "completed")}
    for w in ("shared_prefix", "unique", "hot_prefix"):
        for p in ("round_robin", "least_loaded", "cache_aware"):
            want |= {(f"routing/{w}/{p}", m) for m in ("ttft_p50_ms", "ttft_p99_ms", "requests_per_s")}
    for p in ("round_robin", "cache_aware"):  # unique prompts: also against least_loaded
        want |= {(f"routing/unique/{p}", f"{m}_vs_least_loaded") for m in ("ttft_p50_ms", "ttft_p99_ms",
                                                                            "requests_per_s")}
    assert got == want
    for r in records:
        assert r["suite"] == "router" and r["unit"] and r["baseline"]
        if r["metric"] == "completed":
            assert r["value"] == r["baseline_value"] == r["params"]["requests"]
        elif r["metric"].startswith("added_"):
            assert r["baseline_value"] > 0
        else:
            assert r["value"] > 0 and r["baseline_value"] > 0
        if r["case"].startswith("routing/"):  # medians over the repeats, with their spread
            p = r["params"]
            assert p["repeats"] == len(p["runs"]) >= 1 and p["min"] <= r["value"] <= p["max"]
            assert 0 < p["ratio_min"] <= p["ratio_max"]
