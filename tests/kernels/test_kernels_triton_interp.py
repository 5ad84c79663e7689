"""The Triton kernels on CPU tensors through Triton's interpreter, byte-exact against the reference.

TRITON_INTERPRET is not needed and not set: triton_kernels runs CPU tensors through the interpreter
explicitly, and setting it at import would leak into a GPU run of the whole suite and its
subprocesses.  Caches stay tiny: the interpreter costs about 0.7 ms per program instance.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from kernels_util import allocate, clone_layer, layers_equal
from kvrelay.kernels import KVLayout, pack, unpack
from test_kernels_roundtrip import cases, run_case


@pytest.mark.timeout(300)
@settings(max_examples=40, deadline=None)
@given(cases(max_tokens=24))
def test_triton_roundtrip(c):
    run_case(c, "triton")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn,
                                   torch.float8_e5m2])
def test_triton_dtypes_llama_like(dtype):
    """Every dtype moves as exact bits (NaN payloads included); 16 -> 32 block size, TP=1 -> TP=2."""
    gen = torch.Generator().manual_seed(7)
    src = KVLayout(num_layers=1, num_blocks=6, block_size=16, num_kv_heads=4, head_dim=32, dtype=dtype)
    layer = allocate(src, gen)
    ids = [4, 0, 5]
    out = torch.zeros(src.chunk_nbytes(40), dtype=torch.uint8)
    ref = out.clone()
    pack(src, layer, ids, 3, 43, out, impl="triton")
    pack(src, layer, ids, 3, 43, ref, impl="torch")
    assert torch.equal(out, ref)
    for rank in range(2):
        dst = KVLayout(num_layers=1, num_blocks=3, block_size=32, num_kv_heads=2, head_dim=32, dtype=dtype,
                       order="HND", kv_fused=False, head_start=2 * rank, total_kv_heads=4)
        got = allocate(dst, gen)
        want = clone_layer(got)
        unpack(dst, got, [2, 1], 3, 43, out, 0, 4, impl="triton")
        unpack(dst, want, [2, 1], 3, 43, out, 0, 4, impl="torch")
        assert layers_equal(got, want)
