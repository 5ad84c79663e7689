"""Smoke test of `kvrelay bench transports --quick`: every transport and baseline measured (tcp also with keys:
authenticated and encrypted; Mooncake where installed), ratios recorded with their spread over the repeats, the
4 KiB round trips against the raw socket pair's, the plot written.  Checks the records' structure, not timings."""

from __future__ import annotations

import math
import time

import pytest

from kvrelay.bench import peers, transports
from kvrelay.bench.suites import run_suite
from kvrelay.transfer import available_transports

pytestmark = pytest.mark.slow  # starts several processes: not in the fast tier (-m 'not slow')


@pytest.mark.timeout(300)
def test_transports_quick(tmp_path):
    t0 = time.monotonic()
    records = run_suite("transports", quick=True, progress=False, out_dir=tmp_path)
    elapsed = time.monotonic() - t0
    assert (tmp_path / "transports.png").stat().st_size > 10_000
    baselines = {(r.params.get("transport"), r.baseline) for r in records if r.metric == "throughput"}
    assert {("shm", "memcpy"), ("tcp", "zmq"), ("tcp", "socket"), ("tcp-auth", "socket"),
            ("tcp-encrypt", "socket")} <= baselines
    if available_transports()["nixl"] is None:
        assert ("nixl", "nixl-raw") in baselines
    if peers.mooncake_missing() is None:
        assert {("tcp", "mooncake"), ("mooncake", "socket")} <= baselines
    for r in records:
        assert math.isfinite(r.value) and r.value > 0 and math.isfinite(r.ratio), r
        assert r.repeats == transports.REPEATS and r.ratio_min is not None and r.ratio_max is not None, r
        assert r.ratio_min <= r.ratio <= r.ratio_max, r
    latency = {r.params["transport"]: r for r in records if r.metric == "roundtrip_p50_vs_target"}
    assert set(latency) == {"shm", "tcp"}
    rtt = {r.params["transport"]: r for r in records if r.metric == "roundtrip_p50"}
    assert {"tcp", "tcp-auth", "tcp-encrypt"} <= set(rtt) and all(r.baseline == "socket" for r in rtt.values())
    assert "1.5x" in rtt["tcp"].params["target"]
    print(f"quick transports benchmark: {elapsed:.1f}s, {len(records)} records")
