"""The `kernels` bench suite's record path on a small workload (the full suite: `kvrelay bench kernels`)."""

from __future__ import annotations

import math

import pytest

from kvrelay.bench.kernels import cpu_records, make_workload, measure


@pytest.mark.timeout(120)
def test_kernels_suite_records():
    w = make_workload(512, layers=3)
    records = cpu_records(w, measure(w, repeat=2), layers=3)
    assert [(r.suite, r.case, r.metric, r.baseline) for r in records] == [
        ("kernels", "pack", "GB/s", "memcpy"), ("kernels", "unpack", "GB/s", "memcpy")]
    for r in records:
        assert r.value > 0 and r.baseline_value > 0 and math.isfinite(r.ratio)
        assert r.params["bytes"] == 3 * 512 * 2 * 8 * 128 * 2


@pytest.mark.timeout(120)
def test_host_prep_measures_the_device_path_and_its_baseline():
    from kvrelay.bench.kernels import host_prep
    us = host_prep(calls=50)
    assert set(us) == {"now", "validate_each_call"} and all(0 < v < 1e5 for v in us.values())
