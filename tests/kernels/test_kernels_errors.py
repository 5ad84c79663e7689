"""Bad input: every error raises ValueError naming the problem, before anything is written.

Each test fills the output / cache with known bytes and checks they are untouched after the error.
The native library is also called directly with bad bounds to show the C side re-checks them.
"""

from __future__ import annotations

import pytest
import torch

from kernels_util import allocate, clone_layer, layers_equal
from kvrelay import _native
from kvrelay.kernels import KVLayout, pack, unpack
from kvrelay.kernels.layout import Order
from kvrelay.transfer.wire import ChunkHeader, checksum, verify

IMPLS = ["native", "triton", "torch"]


@pytest.fixture
def setup():
    gen = torch.Generator().manual_seed(1)
    layout = KVLayout(num_layers=1, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16,
                      head_start=2, total_kv_heads=4)
    layer = allocate(layout, gen)
    return layout, layer


def _sentinel(n: int) -> torch.Tensor:
    return torch.full((n,), 0x5A, dtype=torch.uint8)


def _expect_pack_error(layout, layer, match, ids, t0, t1, out=None, impl="native", **kw):
    out = _sentinel(layout.chunk_nbytes(max(int(t1 - t0), 1), 2) + 64) if out is None else out
    before_out, before_layer = out.clone(), clone_layer(layer)
    with pytest.raises(ValueError, match=match):
        pack(layout, layer, ids, t0, t1, out, impl=impl, **kw)
    assert torch.equal(out, before_out) and layers_equal(layer, before_layer)


def _expect_unpack_error(layout, layer, match, ids, t0, t1, chunk, h0=2, h1=4, impl="native"):
    before = clone_layer(layer)
    with pytest.raises(ValueError, match=match):
        unpack(layout, layer, ids, t0, t1, chunk, h0, h1, impl=impl)
    assert layers_equal(layer, before), "the cache was modified by a rejected unpack"


@pytest.mark.parametrize("impl", IMPLS)
def test_block_id_out_of_range(setup, impl):
    layout, layer = setup
    _expect_pack_error(layout, layer, r"block id 8 out of range.*8 blocks", [0, 8], 0, 8, impl=impl)
    _expect_pack_error(layout, layer, r"block id -1 out of range", [-1, 1], 0, 8, impl=impl)
    chunk = _sentinel(layout.chunk_nbytes(8))
    _expect_unpack_error(layout, layer, r"block id 9 out of range", [1, 9], 2, 8, chunk, impl=impl)


def test_unused_block_ids_are_not_checked(setup):
    """Only the blocks that hold the token range matter (a request may list ids past the range)."""
    layout, layer = setup
    out = torch.empty(layout.chunk_nbytes(4), dtype=torch.uint8)
    assert pack(layout, layer, [3, 999], 0, 4, out) == out.numel()


@pytest.mark.parametrize("impl", IMPLS)
def test_token_range_past_blocks(setup, impl):
    layout, layer = setup
    _expect_pack_error(layout, layer, r"needs 3 blocks of 4 tokens, but only 2 block ids", [0, 1], 2, 9, impl=impl)
    chunk = _sentinel(layout.chunk_nbytes(7))
    _expect_unpack_error(layout, layer, r"needs 3 blocks", [0, 1], 2, 9, chunk, impl=impl)


@pytest.mark.parametrize("t0,t1", [(4, 4), (5, 2), (-1, 3)])
def test_empty_or_negative_token_range(setup, t0, t1):
    layout, layer = setup
    _expect_pack_error(layout, layer, r"token range .* empty or negative", [0, 1], t0, t1)


def test_non_int_tokens(setup):
    layout, layer = setup
    _expect_pack_error(layout, layer, r"token_end must be an int", [0, 1], 0, 2.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_chunk_too_small(setup, impl):
    layout, layer = setup
    small = _sentinel(layout.chunk_nbytes(4) - 1)
    _expect_pack_error(layout, layer, r"out is too small: .* bytes, the chunk needs", [0, 1], 0, 4, out=small, impl=impl)
    _expect_unpack_error(layout, layer, r"chunk is too small", [0, 1], 0, 4, small, impl=impl)


def test_out_not_contiguous_or_not_tensor(setup):
    layout, layer = setup
    strided = torch.zeros(2 * layout.chunk_nbytes(4), dtype=torch.uint8)[::2]
    _expect_pack_error(layout, layer, r"out must be contiguous", [0, 1], 0, 4, out=strided)
    with pytest.raises(ValueError, match="out must be a torch.Tensor"):
        pack(layout, layer, [0, 1], 0, 4, bytearray(4096))


def test_wrong_cache_dtype_shape_device(setup):
    layout, layer = setup
    out = _sentinel(layout.chunk_nbytes(4))
    with pytest.raises(ValueError, match=r"dtype mismatch: expected torch.bfloat16, got torch.float16"):
        pack(layout, layer.view(torch.float16), [0], 0, 4, out)
    with pytest.raises(ValueError, match=r"shape mismatch"):
        pack(layout, layer[:, :4], [0], 0, 4, out)
    with pytest.raises(ValueError, match=r"expected one tensor"):
        pack(layout, (layer[0], layer[1]), [0], 0, 4, out)
    meta_out = torch.empty(layout.chunk_nbytes(4), dtype=torch.uint8, device="meta")
    with pytest.raises(ValueError, match=r"out is on meta"):
        pack(layout, layer, [0], 0, 4, meta_out)
    meta_layer = torch.empty(layout.tensor_shape(), dtype=layout.dtype, device="meta")
    with pytest.raises(ValueError, match=r"impl='native' needs a CPU cache"):
        pack(layout, meta_layer, [0], 0, 4, out, impl="native")
    with pytest.raises(ValueError, match=r"impl must be one of"):
        pack(layout, layer, [0], 0, 4, out, impl="cuda")


def test_split_kv_device_mismatch():
    layout = KVLayout(num_layers=1, num_blocks=2, block_size=4, num_kv_heads=1, head_dim=8, dtype=torch.float16,
                      order=Order.NHD, kv_fused=False)
    k = torch.zeros(layout.tensor_shape(), dtype=torch.float16)
    v = torch.zeros(layout.tensor_shape(), dtype=torch.float16, device="meta")
    with pytest.raises(ValueError, match=r"device mismatch"):
        pack(layout, (k, v), [0], 0, 4, torch.empty(1024, dtype=torch.uint8))


def test_bad_block_ids(setup):
    layout, layer = setup
    _expect_pack_error(layout, layer, r"block_ids must be integers", [0.0, 1.0], 0, 4)
    _expect_pack_error(layout, layer, r"block_ids must be (a )?1-D", [[0, 1]], 0, 4)
    _expect_pack_error(layout, layer, r"block_ids must be integers", torch.tensor([0.0]), 0, 4)


@pytest.mark.parametrize("impl", IMPLS)
def test_head_ranges(setup, impl):
    layout, layer = setup  # holds model heads [2, 4) of 4
    _expect_pack_error(layout, layer, r"head range \[0, 3\) is not held by this rank.*\[2, 4\)", [0], 0, 4,
                       impl=impl, head_start=0, head_end=3)
    _expect_pack_error(layout, layer, r"head range \[3, 3\) is invalid", [0], 0, 4, impl=impl, head_start=3,
                       head_end=3)
    _expect_pack_error(layout, layer, r"within the model's 4 KV heads", [0], 0, 4, impl=impl, head_start=2,
                       head_end=5)
    chunk = _sentinel(layout.chunk_nbytes(4, 2))
    _expect_unpack_error(layout, layer, r"chunk heads \[0, 2\) do not intersect this rank's heads \[2, 4\)",
                         [0], 0, 4, chunk, 0, 2, impl=impl)
    _expect_unpack_error(layout, layer, r"chunk_head range \[2, 6\) is invalid", [0], 0, 4, chunk, 2, 6, impl=impl)


def test_checksum_mismatch_detected(setup):
    """A corrupted chunk fails verification (the receiver checks before unpacking)."""
    layout, layer = setup
    out = torch.empty(layout.chunk_nbytes(8), dtype=torch.uint8)
    n = pack(layout, layer, [1, 2], 0, 8, out)
    header = ChunkHeader(compat_hash=layout.compat_hash("m"), layer=0, token_start=0, token_end=8, head_start=2,
                         head_end=4, dtype="bfloat16", nbytes=n, checksum=checksum(out))
    verify(header, out)
    out[17] ^= 1
    with pytest.raises(ValueError, match="checksum mismatch"):
        verify(header, out)


def test_compat_hash_mismatch():
    a = KVLayout(num_layers=2, num_blocks=4, block_size=16, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16)
    b = KVLayout(num_layers=2, num_blocks=9, block_size=32, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16,
                 order="HND")
    c = KVLayout(num_layers=2, num_blocks=4, block_size=16, num_kv_heads=2, head_dim=8, dtype=torch.float16)
    assert a.compat_hash("m") == b.compat_hash("m")  # block size / order are converted, not refused
    assert a.compat_hash("m") != c.compat_hash("m")


def _raw_args(layout, layer, ids, chunk, **over):
    """The 25 ints `_native.copy` takes, for a pack of tokens [0, 4) of a fused NHD layer."""
    v = layout.layer_view(layer)
    t = layer
    extent = t.numel() * t.element_size()
    args = dict(pack=1, base0=t.data_ptr(), extent0=extent, offset0=v.offsets[0], base1=t.data_ptr(),
                extent1=extent, offset1=v.offsets[1], num_kv=2, block_stride=v.block_stride,
                token_stride=v.token_stride, head_stride=v.head_stride, row=v.row_bytes, num_blocks=v.num_blocks,
                block_size=v.block_size, heads=v.num_heads, ids=ids.data_ptr(), num_ids=ids.numel(), t0=0, t1=4,
                cache_h0=0, nh=2, chunk=chunk.data_ptr(), chunk_nbytes=chunk.numel(), chunk_heads=2, chunk_h0=0)
    args.update(over)
    return list(args.values())


@pytest.mark.parametrize("over,match", [
    (dict(t1=5), "needs 2 blocks"),
    (dict(chunk_nbytes=100), "chunk buffer holds 100 bytes"),
    (dict(extent0=1000), "plane 0 reaches byte"),
    (dict(extent1=1000), "plane 1 reaches byte"),
    (dict(num_blocks=9), "reaches byte"),  # a num_blocks larger than the tensor
    (dict(nh=3), "cache heads"),
    (dict(chunk_h0=1), "chunk heads"),
    (dict(t0=3, t1=3), "empty"),
])
def test_native_rechecks_bounds(setup, over, match):
    layout, layer = setup
    ids = torch.tensor([7], dtype=torch.int64)
    chunk = _sentinel(layout.chunk_nbytes(4))
    with pytest.raises(ValueError, match=match):
        _native.copy(*_raw_args(layout, layer, ids, chunk, **over))
    assert torch.equal(chunk, _sentinel(chunk.numel()))
    bad = torch.tensor([8], dtype=torch.int64)
    with pytest.raises(ValueError, match="block id 8"):
        _native.copy(*_raw_args(layout, layer, bad, chunk))
    _native.copy(*_raw_args(layout, layer, ids, chunk))  # the unmodified arguments are accepted
