"""Batch invariance of the numerics (the basis of P/D == colocated) and attention against a dense
reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvrelay.engines.reference import ops


@pytest.mark.timeout(120)
def test_linear_rows_do_not_depend_on_row_count():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(384, 512, generator=g)
    x = torch.randn(300, 512, generator=g)
    ref = ops.linear(x, w)
    for m in list(range(1, 40)) + [63, 64, 65, 129, 257]:
        for off in (0, 3, 11):
            got = ops.linear(x[off:off + m], w)
            assert torch.equal(got, ref[off:off + m]), (m, off)


def _dense(q, k, v, q_start, scale):
    # q [M, Hq, D], k/v [L, Hkv, D] -> SDPA in float64 as the reference
    group = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(group, 1).transpose(0, 1)
    vv = v.double().repeat_interleave(group, 1).transpose(0, 1)
    qq = q.double().transpose(0, 1)
    L, M = k.shape[0], q.shape[0]
    mask = torch.arange(L)[None, :] <= (q_start + torch.arange(M))[:, None]
    out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale)
    return out.transpose(0, 1).float()


@pytest.mark.parametrize("m,start", [(1, 0), (5, 0), (300, 0), (1, 999), (7, 130), (260, 100)])
def test_attention_matches_dense(m, start):
    g = torch.Generator().manual_seed(m + start)
    q = torch.randn(m, 8, 64, generator=g)
    k = torch.randn(start + m, 2, 64, generator=g)
    v = torch.randn(start + m, 2, 64, generator=g)
    got = ops.attention(q, k, v, start, 0.125)
    torch.testing.assert_close(got, _dense(q, k, v, start, 0.125), atol=2e-5, rtol=1e-4)


def test_attention_of_a_query_is_independent_of_the_other_queries():
    g = torch.Generator().manual_seed(1)
    n = 700
    q = torch.randn(n, 8, 64, generator=g)
    k = torch.randn(n, 2, 64, generator=g)
    v = torch.randn(n, 2, 64, generator=g)
    full = ops.attention(q, k, v, 0, 0.125)
    for s, e in ((0, 1), (0, 129), (128, 129), (300, 700), (699, 700), (5, 17)):
        part = ops.attention(q[s:e], k[:e], v[:e], s, 0.125)
        assert torch.equal(part, full[s:e]), (s, e)
