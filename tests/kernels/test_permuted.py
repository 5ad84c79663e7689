"""PermutedBlockCodec (vLLM CPU caches): the native path and the torch path agree with the position map's
definition, element for element, for partial blocks, out-of-order block ids and head slices."""

from __future__ import annotations

import pytest
import torch

from kvrelay.kernels.layout import KVLayout, Order
from kvrelay.kernels.permuted import HAVE_NATIVE, PermutedBlockCodec

PATHS = [False, True] if HAVE_NATIVE else [False]


def _codec(bs: int, hd: int, heads: int, dtype: torch.dtype, native: bool, seed: int = 0,
           head_start: int = 0, total: int = -1) -> PermutedBlockCodec:
    lo = KVLayout(num_layers=1, num_blocks=12, block_size=bs, num_kv_heads=heads, head_dim=hd, dtype=dtype,
                  order=Order.CPU, head_start=head_start, total_kv_heads=total)
    g = torch.Generator().manual_seed(seed)
    return PermutedBlockCodec(lo, torch.randperm(bs * hd, generator=g), torch.randperm(bs * hd, generator=g),
                              use_native=native)


def _expected(codec: PermutedBlockCodec, layer: torch.Tensor, ids: list[int], t0: int, t1: int) -> torch.Tensor:
    """canonical[kv, t, h, d] = layer[block, h] at position perm[kv, t % bs, d], by definition."""
    lo = codec.layout
    region = layer.view(lo.num_blocks, lo.num_kv_heads, -1)
    out = torch.empty(2, t1 - t0, lo.num_kv_heads, lo.head_dim, dtype=lo.dtype)
    perm = codec.perm.view(2, lo.block_size, lo.head_dim)
    for kv in range(2):
        for t in range(t0, t1):
            out[kv, t - t0] = region[ids[t // lo.block_size]][:, perm[kv, t % lo.block_size]]
    return out


@pytest.mark.parametrize("native", PATHS)
@pytest.mark.parametrize("bs,hd,dtype", [(32, 64, torch.bfloat16), (16, 32, torch.float32), (8, 16, torch.float16)])
@pytest.mark.parametrize("t0,t1", [(0, 64), (5, 61), (17, 18), (40, 96)])
def test_pack_matches_the_map(native, bs, hd, dtype, t0, t1):
    codec = _codec(bs, hd, 2, dtype, native)
    lo = codec.layout
    layer = torch.randn(lo.num_blocks, 2, bs, 2 * hd).to(dtype)
    ids = [9, 2, 7, 0, 11, 4, 3, 10, 1, 5, 6, 8]
    if t1 > len(ids) * bs:
        pytest.skip("range beyond the blocks")
    out = torch.zeros(lo.chunk_nbytes(t1 - t0) + 7, dtype=torch.uint8)
    n = codec.pack(layer, ids, t0, t1, out)
    assert n == lo.chunk_nbytes(t1 - t0)
    got = out[:n].view(dtype).view(2, t1 - t0, 2, hd)
    assert torch.equal(got, _expected(codec, layer, ids, t0, t1))


@pytest.mark.parametrize("native", PATHS)
@pytest.mark.parametrize("t0,t1", [(0, 64), (3, 50), (31, 33)])
def test_unpack_writes_only_its_tokens_and_heads(native, t0, t1):
    """A cache holding model heads [1, 3) of 4 takes its slice of a 4-head chunk; nothing else changes."""
    bs, hd = 16, 32
    codec = _codec(bs, hd, 2, torch.bfloat16, native, seed=3, head_start=1, total=4)
    lo = codec.layout
    layer = torch.randn(lo.num_blocks, 2, bs, 2 * hd).to(torch.bfloat16)
    before = layer.clone()
    ids = [4, 8, 1, 6, 0, 2]
    chunk = torch.randn(2, t1 - t0, 4, hd).to(torch.bfloat16)
    codec.unpack(layer, ids, t0, t1, chunk.view(-1).view(torch.uint8), 0, 4)
    assert torch.equal(_expected(codec, layer, ids, t0, t1), chunk[:, :, 1:3])
    # every other element is untouched: write the old values back through the map and compare
    codec.unpack(layer, ids, t0, t1, _expected(codec, before, ids, t0, t1).contiguous().view(torch.uint8).view(-1),
                 1, 3)
    assert torch.equal(layer, before)


@pytest.mark.skipif(not HAVE_NATIVE, reason="the native library is not built")
def test_native_and_torch_paths_agree_on_a_roundtrip():
    fast, slow = (_codec(32, 64, 2, torch.bfloat16, n, seed=7) for n in (True, False))
    lo = fast.layout
    layer = torch.randn(lo.num_blocks, 2, 32, 128).to(torch.bfloat16)
    ids = list(range(11, -1, -1))
    a, b = (torch.empty(lo.chunk_nbytes(300), dtype=torch.uint8) for _ in range(2))
    fast.pack(layer, ids, 10, 310, a)
    slow.pack(layer, ids, 10, 310, b)
    assert torch.equal(a, b)
    x, y = torch.zeros_like(layer), torch.zeros_like(layer)
    fast.unpack(x, ids, 10, 310, a, 0, 2)
    slow.unpack(y, ids, 10, 310, a, 0, 2)
    assert torch.equal(x, y)


@pytest.mark.parametrize("native", PATHS)
def test_bad_block_ids_and_short_buffers_are_refused(native):
    codec = _codec(16, 32, 2, torch.bfloat16, native)
    lo = codec.layout
    layer = torch.zeros(lo.num_blocks, 2, 16, 64, dtype=torch.bfloat16)
    out = torch.empty(lo.chunk_nbytes(32), dtype=torch.uint8)
    with pytest.raises(ValueError, match="block ids"):
        codec.pack(layer, [0, 99], 0, 32, out)
    with pytest.raises(ValueError, match="cannot hold tokens"):
        codec.pack(layer, [0], 0, 32, out)
    with pytest.raises(ValueError, match="at least"):
        codec.pack(layer, [0, 1], 0, 32, out[:100])
    with pytest.raises(ValueError, match="bytes"):
        codec.unpack(layer, [0, 1], 0, 32, out[:100], 0, 2)


@pytest.mark.parametrize("native", PATHS)
@pytest.mark.parametrize("t0,t1", [(0, 64), (3, 50)])
def test_head_slices_pack_and_unpack_part_of_a_ranks_heads(native, t0, t1):
    """Tensor parallelism: a rank holding model heads [2, 6) of 8 packs a slice of them, [4, 6), and takes a
    chunk of heads [0, 4) (another rank's cut) by writing only the heads it shares, [2, 4)."""
    bs, hd = 16, 32
    codec = _codec(bs, hd, 4, torch.bfloat16, native, seed=5, head_start=2, total=8)
    lo = codec.layout
    layer = torch.randn(lo.num_blocks, 4, bs, 2 * hd).to(torch.bfloat16)
    ids = [4, 8, 1, 6, 0, 2]
    out = torch.zeros(lo.chunk_nbytes(t1 - t0, 2), dtype=torch.uint8)
    assert codec.pack(layer, ids, t0, t1, out, 4, 6) == out.numel()
    want = _expected(codec, layer, ids, t0, t1)
    assert torch.equal(out.view(torch.bfloat16).view(2, t1 - t0, 2, hd), want[:, :, 2:4])
    with pytest.raises(ValueError, match=r"not a non-empty part of this cache's \[2, 6\)"):
        codec.pack(layer, ids, t0, t1, out, 5, 7)
    before = layer.clone()
    chunk = torch.randn(2, t1 - t0, 4, hd).to(torch.bfloat16)
    codec.unpack(layer, ids, t0, t1, chunk.view(-1).view(torch.uint8), 0, 4)
    after = _expected(codec, layer, ids, t0, t1)
    assert torch.equal(after[:, :, :2], chunk[:, :, 2:4])  # heads 2, 3 from the chunk
    assert torch.equal(after[:, :, 2:], want[:, :, 2:])  # heads 4, 5 untouched
    with pytest.raises(ValueError, match="none of this cache's"):
        codec.unpack(before, ids, t0, t1, chunk.view(-1).view(torch.uint8), 6, 8)
