"""Smoke test of `kvrelay bench transports --quick`: every transport and baseline measured, ratios
recorded, the plot written, and quick mode inside its one-minute budget (on an idle machine)."""

from __future__ import annotations

import math
import time

import pytest

from kvrelay.bench.harness import run_suite
from kvrelay.transfer import available_transports


@pytest.mark.timeout(300)
def test_transports_quick(tmp_path):
    t0 = time.monotonic()
    records = run_suite("transports", quick=True, progress=False, out_dir=tmp_path)
    elapsed = time.monotonic() - t0
    assert (tmp_path / "transports.png").stat().st_size > 10_000
    baselines = {(r.params.get("transport"), r.baseline) for r in records if r.metric == "throughput"}
    assert ("shm", "memcpy") in baselines and ("tcp", "zmq") in baselines and ("tcp", "socket") in baselines
    if available_transports()["nixl"] is None:
        assert ("nixl", "nixl-raw") in baselines
    for r in records:
        assert math.isfinite(r.value) and r.value > 0 and math.isfinite(r.ratio), r
    latency = {r.params["transport"]: r for r in records if r.metric == "roundtrip_p50_vs_target"}
    assert set(latency) == {"shm", "tcp"}
    print(f"quick transports benchmark: {elapsed:.1f}s, {len(records)} records")
