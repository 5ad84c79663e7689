"""Property tests: pack -> unpack across the layout matrix, byte-exact against the torch reference.

A random "model" KV (canonical bytes for every token and head) is written into a source rank's cache;
each source rank packs its heads; each destination rank (other order, block size, TP degree, padding)
unpacks every chunk that touches its heads.  We check (1) pack output == reference pack, (2) the
destination cache equals the one the reference unpack produced, padding bytes included, and (3) the
destination holds exactly the model KV for the transferred tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels_util import DTYPES, allocate, clone_layer, layers_equal, rank_layouts, write_logical
from kvrelay.kernels import pack, unpack
from kvrelay.kernels.layout import Order

ORDERS = [("NHD", True), ("NHD", False), ("HND", True), ("HND", False), ("CPU", True), ("MLA", True)]
BLOCK_SIZES = [1, 2, 3, 4, 8, 16, 32]


@st.composite
def cases(draw, max_tokens: int = 70):
    dtype = draw(st.sampled_from(DTYPES))
    src_order, src_fused = draw(st.sampled_from(ORDERS))
    mla = src_order == "MLA"
    if mla:
        dst_order, dst_fused = "MLA", True
        total, head_dim, tp_src, tp_dst = 1, draw(st.integers(1, 40)), 1, 1
    else:
        dst_order, dst_fused = draw(st.sampled_from([o for o in ORDERS if o[0] != "MLA"]))
        total = draw(st.sampled_from([1, 2, 4]))
        head_dim = draw(st.integers(1, 12))
        tp_src = draw(st.sampled_from([t for t in (1, 2, 4) if total % t == 0]))
        tp_dst = draw(st.sampled_from([t for t in (1, 2, 4) if total % t == 0]))
    n = draw(st.integers(1, max_tokens))
    start = draw(st.integers(0, n - 1))
    end = draw(st.integers(start + 1, n))
    return dict(dtype=dtype, src=(src_order, src_fused), dst=(dst_order, dst_fused), total=total,
                head_dim=head_dim, tp_src=tp_src, tp_dst=tp_dst, n=n, start=start, end=end,
                bs_src=draw(st.sampled_from(BLOCK_SIZES)), bs_dst=draw(st.sampled_from(BLOCK_SIZES)),
                padded=draw(st.booleans()), ids_as=draw(st.sampled_from(["list", "numpy", "tensor"])),
                seed=draw(st.integers(0, 2**31 - 1)))


def _ids(rng: np.random.Generator, n_tokens: int, bs: int, spare: int, as_: str):
    need = -(-n_tokens // bs)
    num_blocks = need + spare
    ids = rng.permutation(num_blocks)[:need]
    out = {"list": ids.tolist(), "numpy": ids.astype(np.int32), "tensor": torch.from_numpy(ids)}[as_]
    return num_blocks, out


def run_case(c: dict, impl: str) -> None:
    gen = torch.Generator().manual_seed(c["seed"])
    rng = np.random.default_rng(c["seed"])
    itemsize = torch.empty((), dtype=c["dtype"]).element_size()
    num_kv = 1 if c["src"][0] == "MLA" else 2
    logical = torch.randint(0, 256, (num_kv, c["n"], c["total"], c["head_dim"] * itemsize), dtype=torch.uint8,
                            generator=gen)
    nb_src, ids_src = _ids(rng, c["n"], c["bs_src"], 3, c["ids_as"])
    nb_dst, ids_dst = _ids(rng, c["n"], c["bs_dst"], 2, c["ids_as"])
    srcs = rank_layouts(*c["src"], c["dtype"], c["bs_src"], c["total"], c["tp_src"], c["head_dim"], nb_src)
    dsts = rank_layouts(*c["dst"], c["dtype"], c["bs_dst"], c["total"], c["tp_dst"], c["head_dim"], nb_dst)
    s, e = c["start"], c["end"]
    chunks = []
    for lay in srcs:
        layer = allocate(lay, gen, padded=c["padded"])
        write_logical(lay, layer, ids_src, logical)
        before = clone_layer(layer)
        out = torch.full((lay.chunk_nbytes(e - s) + 7,), 0xAB, dtype=torch.uint8)  # + a guard tail
        ref = out.clone()
        assert pack(lay, layer, ids_src, s, e, out, impl=impl) == lay.chunk_nbytes(e - s)
        pack(lay, layer, ids_src, s, e, ref, impl="torch")
        assert torch.equal(out, ref), "pack differs from the reference"
        assert torch.equal(out[-7:], torch.full((7,), 0xAB, dtype=torch.uint8)), "pack wrote past the chunk"
        assert layers_equal(layer, before), "pack modified the cache"
        want = logical[:, s:e, lay.head_start:lay.head_end].reshape(-1)
        assert torch.equal(out[: want.numel()], want), "pack does not hold the model's KV"
        chunks.append((lay.head_start, lay.head_end, out))
    for lay in dsts:
        layer = allocate(lay, gen, padded=not c["padded"])
        expect = clone_layer(layer)
        for h0, h1, chunk in chunks:
            if h1 <= lay.head_start or h0 >= lay.head_end:
                continue
            assert unpack(lay, layer, ids_dst, s, e, chunk, h0, h1, impl=impl) == lay.chunk_nbytes(e - s, h1 - h0)
            unpack(lay, expect, ids_dst, s, e, chunk, h0, h1, impl="torch")
        assert layers_equal(layer, expect), "unpack differs from the reference (or wrote outside the tokens)"
        back = torch.empty(lay.chunk_nbytes(e - s), dtype=torch.uint8)
        pack(lay, layer, ids_dst, s, e, back, impl="torch")
        want = logical[:, s:e, lay.head_start:lay.head_end].reshape(-1)
        assert torch.equal(back, want), "the destination does not hold the model's KV"


@pytest.mark.timeout(240)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_native_roundtrip(c):
    run_case(c, "native")


@pytest.mark.timeout(120)
@settings(max_examples=40, deadline=None)
@given(cases(max_tokens=40))
def test_native_parallel_pool(c):
    """The same matrix with the pool forced on (every copy split across threads)."""
    from kvrelay.kernels import native
    native.set_parallel_threshold(0)
    native.set_backoff(0)
    saved = native.get_stream_threshold()
    native.set_stream_threshold(0)
    try:
        run_case(c, "native")
    finally:
        native.set_parallel_threshold(1 << 20)
        native.set_backoff(0.05)
        native.set_stream_threshold(saved)


@pytest.mark.parametrize("src,dst,head_dim,dtype", [(16, 32, 128, torch.bfloat16), (128, 16, 128, torch.bfloat16),
                                                   (16, 16, 67, torch.float16), (32, 8, 33, torch.float8_e4m3fn)])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.timeout(120)
def test_llama_shape(src, dst, head_dim, dtype, stream):
    """Llama-3-8B-like geometry (8 KV heads, NHD fused), TP=1 -> TP=2 and back, pooled, with and without
    streaming stores (odd head dims make runs that start and end off 16-byte boundaries)."""
    from kvrelay.kernels import native
    native.set_parallel_threshold(0)
    native.set_backoff(0)
    saved = native.get_stream_threshold()
    native.set_stream_threshold(0 if stream else 1 << 60)
    try:
        c = dict(dtype=dtype, src=("NHD", True), dst=("NHD", True), total=8, head_dim=head_dim, tp_src=1,
                 tp_dst=2, n=1000, start=5, end=997, bs_src=src, bs_dst=dst, padded=False, ids_as="list", seed=src)
        run_case(c, "native")
        c.update(tp_src=2, tp_dst=1, dst=("HND", False), padded=True)
        run_case(c, "native")
    finally:
        native.set_parallel_threshold(1 << 20)
        native.set_backoff(0.05)
        native.set_stream_threshold(saved)


def test_order_enum_accepted():
    assert Order("NHD") is Order.NHD
