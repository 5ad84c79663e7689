"""The chunk checksum: the native parallel tree hash equals its Python definition, catches a flipped byte
anywhere, and the fused copy+checksum copies exactly and refuses bad buffers with a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvrelay.transfer import wire
from kvrelay.transfer.wire import LEAF_BYTES, checksum, checksum_reference, copy_into

SIZES = [0, 1, 7, LEAF_BYTES - 1, LEAF_BYTES, LEAF_BYTES + 1, 3 * LEAF_BYTES + 5, (4 << 20) + 17, 64 * LEAF_BYTES]


@pytest.mark.parametrize("n", SIZES)
def test_native_equals_reference_and_copy_is_exact(n):
    assert wire._native is not None, "the native library must be built (pip install -e .)"
    src = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    want = checksum_reference(src)
    assert checksum(src) == want
    dst = np.zeros(n, np.uint8)
    assert copy_into(dst, src, True) == want
    assert np.array_equal(dst, src)
    dst[:] = 0
    assert copy_into(dst, src, False) is None and np.array_equal(dst, src)
    for with_sum in (True, False):  # non-temporal stores: same bytes, same sum (unaligned tails included)
        dst[:] = 0
        assert copy_into(dst, src, with_sum, stream=True) == (want if with_sum else None)
        assert np.array_equal(dst, src)
        if n > 3:
            d2 = np.zeros(n + 3, np.uint8)
            assert copy_into(d2[3:], src, True, stream=True) == want and np.array_equal(d2[3:], src)


def test_every_leaf_and_length_matters():
    src = np.random.default_rng(1).integers(0, 256, 5 * LEAF_BYTES + 3, dtype=np.uint8)
    base = checksum(src)
    for pos in (0, LEAF_BYTES - 1, LEAF_BYTES, 3 * LEAF_BYTES + 9, src.size - 1):
        src[pos] ^= 0x10
        assert checksum(src) != base, pos
        src[pos] ^= 0x10
    assert checksum(src[:-1]) != base
    # reordered leaves give a different sum
    swapped = np.concatenate([src[LEAF_BYTES:2 * LEAF_BYTES], src[:LEAF_BYTES], src[2 * LEAF_BYTES:]])
    assert checksum(swapped) != base


def test_tensors_of_any_dtype_hash_their_bytes():
    t = torch.randn(3, 1000, dtype=torch.bfloat16)
    assert checksum(t) == checksum_reference(t.view(torch.uint8).numpy().tobytes())
    out = torch.empty_like(t)
    assert copy_into(out, t, True) == checksum(t) and torch.equal(out, t)


def test_bad_buffers_are_refused():
    a = np.zeros(100, np.uint8)
    with pytest.raises(ValueError, match="destination has 99 bytes, source 100"):
        copy_into(np.zeros(99, np.uint8), a)
    with pytest.raises(ValueError, match="overlap"):
        big = np.zeros(200, np.uint8)
        copy_into(big[50:150], big[:100])
    with pytest.raises(ValueError, match="read-only"):
        copy_into(bytes(100), a)
    with pytest.raises(ValueError, match="contiguous"):
        checksum(torch.zeros(10, 10).t())
