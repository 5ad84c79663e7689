"""Smoke test of `kvrelay bench hosts --quick`: tcp (plain, authenticated, encrypted), nixl, a bare NIXL pair and
Mooncake (where installed) measured against a peer in another network namespace across a veth, each beside a
raw socket pair across the same veth, and the loopback pair of the same run; every record carries its spread over
the repeats and the issue's target where it has one; no namespace or veth left behind.  Checks the records'
structure, not the timings.  Needs root (`ip netns`)."""

from __future__ import annotations

import math
import multiprocessing
import os
import subprocess
from concurrent.futures import ProcessPoolExecutor

import pytest

from kvrelay.bench import hosts, netns, peers
from kvrelay.bench.suites import run_suite
from kvrelay.transfer import available_transports

pytestmark = pytest.mark.slow  # starts several processes: not in the fast tier (-m 'not slow')

WHY = netns.unavailable()


@pytest.mark.skipif(WHY is not None, reason=f"hosts made of network namespaces: {WHY}")
@pytest.mark.timeout(300)
def test_hosts_quick(tmp_path):
    # in a fresh process, as `kvrelay bench hosts` runs: a NIXL agent created after this test process already
    # made others (the transport tests) fails with NIXL_ERR_BACKEND when pointed at a veth made since
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        records = ex.submit(run_suite, "hosts", True, False, tmp_path).result(timeout=280)
    pairs = {(r.case.split("/")[0], r.baseline) for r in records if r.metric == "throughput"}
    want = {("tcp", "socket"), ("tcp-auth", "socket"), ("tcp-encrypt", "socket"), ("tcp-lo", "socket-lo")}
    if available_transports()["nixl"] is None:
        want |= {("nixl", "socket"), ("nixl-raw", "socket"), ("nixl", "nixl-raw")}
    if peers.mooncake_missing() is None:
        want |= {("mooncake", "socket"), ("tcp", "mooncake")}
    assert pairs == want
    for r in records:
        assert math.isfinite(r.value) and r.value > 0 and math.isfinite(r.ratio), r
        assert r.repeats == hosts.REPEATS and r.ratio_min is not None and r.ratio_max is not None, r
        assert r.ratio_min <= r.ratio <= r.ratio_max, r
    sizes = {r.params["bytes"] for r in records if r.metric == "throughput"}
    assert sizes == set(hosts.SIZES_QUICK)
    targets = {r.case: r.params.get("target") for r in records if r.metric == "throughput" and r.baseline.startswith("socket")}
    assert targets["tcp/read/1MiB"] == 0.9 and targets["tcp-encrypt/read/1MiB"] == 0.7 and targets["tcp/read/4KiB"] is None
    rtt = {r.case for r in records if r.metric == "roundtrip_p50"}
    assert {"tcp/read/4KiB", "tcp-auth/read/4KiB", "tcp-encrypt/read/4KiB", "tcp-lo/read/4KiB"} <= rtt
    across = {r.params["across"] for r in records if not r.case.startswith("tcp-lo")}
    assert across == {"veth between network namespaces"}
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [ln for ln in left.splitlines() if ln.startswith(f"{netns.PREFIX}-{os.getpid()}-b")]
