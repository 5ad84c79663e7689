"""Smoke test of `kvrelay bench pd --quick` (run explicitly: ``python -m pytest bench/test_bench_pd.py``).

Checks the suite runs end to end on a real store over every available CPU transport, reports each
figure beside its baseline, and that layer-wise publishing hides most of the transfer (the exposed part
is measured inside each run, so this holds under machine load too)."""

from __future__ import annotations

import pytest

from kvrelay.bench.suites import run_suite

pytestmark = pytest.mark.slow  # starts several processes: not in the fast tier (-m 'not slow')


@pytest.mark.timeout(900)
def test_pd_suite_quick():
    records = run_suite("pd", quick=True, progress=False)
    by = {(r.case, r.metric): r for r in records}
    transports = {r.case.split("/")[0] for r in records}
    assert {"shm", "tcp"} <= transports
    for t in transports:
        case = f"{t}/1024tok"
        for metric in ("ttft",):
            assert by[(case + "/layerwise", metric)].value > 0 and by[(case + "/after", metric)].value > 0
        exposed = by[(case + "/layerwise", "exposed_transfer")]
        assert exposed.value < exposed.baseline_value, exposed
        assert by[(case, "transfer_hidden_fraction")].value > 0.3
        assert by[(case + "/layerwise", "overhead_pct")].value < 10.0
