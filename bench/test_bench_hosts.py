"""Smoke test of `kvrelay bench hosts --quick`: tcp and nixl measured against a peer in another network
namespace across a veth, each beside a raw socket pair across the same veth, and the loopback pair of the
same run; no namespace or veth left behind.  Needs root (`ip netns`)."""

from __future__ import annotations

import math
import multiprocessing
import os
import subprocess
from concurrent.futures import ProcessPoolExecutor

import pytest

from kvrelay.bench import netns
from kvrelay.bench.harness import run_suite
from kvrelay.transfer import available_transports

WHY = netns.unavailable()


@pytest.mark.skipif(WHY is not None, reason=f"hosts made of network namespaces: {WHY}")
@pytest.mark.timeout(300)
def test_hosts_quick(tmp_path):
    # in a fresh process, as `kvrelay bench hosts` runs: a NIXL agent created after this test process already
    # made others (the transport tests) fails with NIXL_ERR_BACKEND when pointed at a veth made since
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        records = ex.submit(run_suite, "hosts", True, False, tmp_path).result(timeout=280)
    pairs = {(r.case.split("/")[0], r.baseline) for r in records if r.metric == "throughput"}
    want = {("tcp", "socket"), ("tcp-lo", "socket-lo")}
    if available_transports()["nixl"] is None:
        want.add(("nixl", "socket"))
    assert pairs == want
    for r in records:
        assert math.isfinite(r.value) and r.value > 0 and math.isfinite(r.ratio), r
    across = {r.params["across"] for r in records if not r.case.startswith("tcp-lo")}
    assert across == {"veth between network namespaces"}
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [ln for ln in left.splitlines() if ln.startswith(f"{netns.PREFIX}-{os.getpid()}-b")]
