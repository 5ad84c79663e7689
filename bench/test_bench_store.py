"""Smoke test of `kvrelay bench store`: the publish/pull cases run against a real daemon and produce
records with measured (positive, finite) values and baselines; byte-exactness is checked inside."""

from __future__ import annotations

import math

import pytest

from kvrelay.bench.harness import BenchContext
from kvrelay.bench.store import COMPAT, _publish_and_pull
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
