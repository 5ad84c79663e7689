"""Smoke test of `kvrelay bench store`: the publish/pull cases run against a real daemon and produce
records with measured (positive, finite) values and baselines; byte-exactness is checked inside.  The tcp pull
case's records carry the spread over its passes and the issue's 0.85 target (structure, not timings)."""

from __future__ import annotations

import math

import pytest

from kvrelay.bench.harness import BenchContext
from kvrelay.bench.store import COMPAT, PULL_TARGET, _publish_and_pull, _remote_case
from kvrelay.store.client import StoreClient
from kvrelay.store.process import DaemonProcess


@pytest.mark.timeout(120)
def test_store_bench_publish_pull_records():
    ctx = BenchContext(suite="store", quick=True, progress=False)
    with DaemonProcess(pool_size="64MiB", max_chunk_bytes="1MiB") as d:
        with StoreClient(d.address, compat_hash=COMPAT) as c:
            _publish_and_pull(ctx, c, n=4, chunk=1 << 20, reps=2, params={"smoke": True})
            assert c.stats()["commits"] == 16
    cases = {r.case for r in ctx.records}
    assert cases == {"publish/shm", "publish/shm/sync", "pull/shm", "pull/shm/noverify", "pull/shm/batch"}
    for r in ctx.records:
        assert r.value > 0 and r.baseline_value > 0 and math.isfinite(r.ratio), r


@pytest.mark.slow  # starts a daemon serving tcp and a client process
@pytest.mark.timeout(180)
def test_store_bench_tcp_pull_records():
    ctx = BenchContext(suite="store", quick=True, progress=False)
    with DaemonProcess(pool_size="64MiB", max_chunk_bytes="1MiB", transports="shm,tcp") as d:
        _remote_case(ctx, d.address, "tcp", 1 << 20, 2, {"smoke": True})
    assert [r.case for r in ctx.records] == ["pull/tcp", "pull/tcp/batch"]
    for r in ctx.records:
        assert r.value > 0 and r.baseline_value > 0 and math.isfinite(r.ratio), r
        assert r.repeats == 2 and r.ratio_min is not None and r.ratio_max is not None
        assert r.ratio_min <= r.ratio <= r.ratio_max and r.params["target"] == PULL_TARGET
