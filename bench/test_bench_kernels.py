"""pytest-benchmark view of the `kernels` suite: memcpy vs pack vs unpack for a Llama-3-8B-like layer.

Run: ``python -m pytest bench/test_bench_kernels.py --benchmark-group-by=param:tokens`` (add
``--benchmark-json FILE`` to keep the numbers).  Each benchmark stores its payload GB/s in
``extra_info``; the pack/unpack results are byte-checked against the reference once per size.  A
smoke test runs the suite's own record path on a small workload.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvrelay.bench.harness import BenchContext
from kvrelay.bench.kernels import cpu_records, make_workload, measure
from kvrelay.kernels import pack

TOKENS = [2048, 8192, 32768]


@pytest.fixture(scope="module", params=TOKENS)
def workload(request):
    w = make_workload(request.param, layers=1)
    yield w
    del w


def _gbps(benchmark, nbytes: int) -> None:
    benchmark.extra_info["bytes"] = nbytes
    if benchmark.stats is not None:
        benchmark.extra_info["GB/s"] = nbytes / benchmark.stats.stats.median / 1e9


@pytest.mark.timeout(300)
def test_memcpy(benchmark, workload):
    src, dst = workload.chunks[0], workload.dst[0]
    benchmark.pedantic(dst.copy_, args=(src,), rounds=20, warmup_rounds=2)
    _gbps(benchmark, workload.nbytes)
    assert torch.equal(dst, src)


@pytest.mark.timeout(300)
def test_pack(benchmark, workload):
    w = workload
    layer, out = w.layers[0], w.chunks[0]
    benchmark.pedantic(pack, args=(w.layout, layer, w.ids, 0, w.tokens, out), rounds=20, warmup_rounds=2)
    _gbps(benchmark, w.nbytes)
    ref = torch.empty_like(out)
    pack(w.layout, layer, w.ids, 0, w.tokens, ref, impl="torch")
    assert torch.equal(out, ref)


@pytest.mark.timeout(300)
def test_unpack(benchmark, workload):
    from kvrelay.kernels import unpack
    w = workload
    layer, chunk = w.layers[0], w.chunks[0]
    chunk.copy_(torch.randint(0, 256, chunk.shape, dtype=torch.uint8))
    benchmark.pedantic(unpack, args=(w.layout, layer, w.ids, 0, w.tokens, chunk, 0, w.layout.num_kv_heads),
                       rounds=20, warmup_rounds=2)
    _gbps(benchmark, w.nbytes)
    back = torch.empty_like(chunk)
    pack(w.layout, layer, w.ids, 0, w.tokens, back, impl="torch")
    assert torch.equal(back, chunk)


@pytest.mark.timeout(120)
def test_suite_records_smoke():
    ctx = BenchContext(suite="kernels", quick=True, progress=False)
    w = make_workload(256, layers=2)
    for r in cpu_records(w, measure(w, repeat=2), layers=2):
        ctx.add(r)
    assert [r.case for r in ctx.records] == ["pack", "unpack"]
    for r in ctx.records:
        assert r.metric == "GB/s" and r.baseline == "memcpy"
        assert r.value > 0 and r.baseline_value > 0 and math.isfinite(r.ratio)
        assert r.params["tokens"] == 256 and r.params["layers"] == 2
