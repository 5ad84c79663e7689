"""Smoke test of `kvrelay bench hosts`' cluster case, quick (issue 23): two four-host clusters of network
namespaces (a store per host, one central store) side by side, one repeat each; the records carry each link's
bytes per request and P/D throughput beside the central store's, and the figure that tells them apart (bytes
sent by all hosts per KV byte: about 1 against about 2) shows it; no namespace left behind.  Checks the records'
structure and that one crossing, not the timings.  Needs root (`ip netns`)."""

from __future__ import annotations

import math
import os
import subprocess

import pytest

from kvrelay.bench import hosts_cluster, netns
from kvrelay.bench.harness import BenchContext

pytestmark = pytest.mark.slow  # two clusters of kvrelay up processes: minutes

WHY = netns.unavailable()


@pytest.mark.skipif(WHY is not None, reason=f"hosts made of network namespaces: {WHY}")
@pytest.mark.timeout(900)
def test_cluster_case_quick(tmp_path):
    ctx = BenchContext(suite="hosts", quick=True, progress=False, out_dir=tmp_path)
    results, skipped = hosts_cluster.measure(ctx)
    assert not skipped
    for layout in hosts_cluster.LAYOUTS:
        assert len(results[layout]) == hosts_cluster.REPEATS_QUICK
        assert all(r["recomputed"] == 0 and r["kv_per_request"] > 0 for r in results[layout]), results[layout]
    hosts_cluster.add_records(ctx, results)
    by = {(r.case, r.metric): r for r in ctx.records}
    links = {f"cluster/link-{n}" for n in hosts_cluster.HOSTS}
    assert {c for c, _ in by} == {"cluster/all-links", "cluster/kv", "cluster/pd"} | links
    for r in ctx.records:
        assert math.isfinite(r.value) and r.value > 0 and r.baseline == "central-store", r
        assert r.params["across"] == hosts_cluster.ACROSS and r.repeats == 1, r
    sent = by[("cluster/all-links", "bytes_sent_per_kv_byte")]
    assert sent.value < 1.3 and sent.baseline_value >= 1.9, sent  # one crossing per KV byte, against two
    router = by[("cluster/link-r", "link_bytes_per_request")]
    kv = by[("cluster/kv", "kv_bytes_per_request")]
    assert router.value < 0.05 * kv.value <= router.baseline_value, (router, kv)  # no KV through the router host
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [ln for ln in left.splitlines() if ln.startswith(f"{netns.PREFIX}-{os.getpid()}-")]
