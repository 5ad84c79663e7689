"""Batch-invariant numerics: linear, RMSNorm, RoPE and attention whose per-token results do not depend
on how many other tokens share the call.

This is what makes P/D output token-identical to colocated: the KV of a prompt token must come out
byte-identical whether it was computed in a 2,000-token prefill, a 300-token prefill whose prefix was
cached, or never computed here at all (pulled).  CPU GEMMs (oneDNN/MKL) round the rows of a partial
row tile differently from full tiles (8 rows on AVX2 machines; on an AVX-512 one, a GEMM of 8 rows
rounded differently from the same rows inside a larger one), so every GEMM's row count is padded to a
multiple of `ROW_TILE`, and attention runs over fixed-size key blocks aligned to absolute positions (online
softmax, a fixed order), so a query's result never depends on the prompt length or the batch.
tests/engine/test_ops.py checks the invariance.  Must not touch: the cache layout, scheduling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ROW_TILE = 16  # GEMM rows are padded to a multiple of this (see module docstring); 8 was not enough on AVX-512
KEY_BLOCK = 128  # attention key block, aligned to absolute positions
QUERY_TILE = 256  # queries per attention tile (a multiple of ROW_TILE)


def _pad_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    m = x.shape[0]
    rem = m % ROW_TILE
    if rem == 0:
        return x, m
    padded = x.new_zeros((m + ROW_TILE - rem, *x.shape[1:]))
    padded[:m] = x
    return padded, m


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for 2-d ``x`` with row results independent of the row count."""
    xp, m = _pad_rows(x)
    out = F.linear(xp, weight, bias)
    return out if out.shape[0] == m else out[:m]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    var = x.pow(2).mean(-1, keepdim=True)
    return x * torch.rsqrt(var + eps) * weight


def rope_tables(head_dim: int, max_position: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_position, head_dim // 2] in float32 (computed in float64 for accuracy)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ang = torch.arange(max_position, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF Llama convention).  x: [tokens, heads, head_dim]; cos/sin: [tokens, head_dim//2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, scale: float) -> torch.Tensor:
    """Causal GQA attention of queries at positions ``q_start + i`` over keys at positions ``0..L-1``.

    q: [Mq, Hq, D]; k, v: [L, Hkv, D] with L >= q_start + Mq.  Returns [Mq, Hq, D] (float32 math).
    """
    mq, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    out = torch.empty((mq, hq, d), dtype=torch.float32)
    for t0 in range(0, mq, QUERY_TILE):
        t1 = min(mq, t0 + QUERY_TILE)
        out[t0:t1] = _attention_tile(q[t0:t1], k, v, q_start + t0, scale, group)
    return out


def _attention_tile(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, scale: float,
                    group: int) -> torch.Tensor:
    m, hq, d = q.shape
    hkv = k.shape[1]
    mp = -(-m // ROW_TILE) * ROW_TILE
    # [Hkv, group * Mp, D]: row (g, i) is query i of head hkv * group + g.
    qp = q.new_zeros((mp, hq, d), dtype=torch.float32)
    qp[:m] = q
    qh = qp.view(mp, hkv, group, d).permute(1, 2, 0, 3).reshape(hkv, group * mp, d) * scale
    pos = (q_start + torch.arange(mp)).repeat(group)  # [group * Mp]
    last = q_start + m  # keys needed: [0, last)
    row_max = torch.full((hkv, group * mp, 1), float("-inf"))
    row_sum = torch.zeros((hkv, group * mp, 1))
    acc = torch.zeros((hkv, group * mp, d))
    for k0 in range(0, last, KEY_BLOCK):
        k1 = k0 + KEY_BLOCK
        kb = _key_block(k, k0, k1)  # [Hkv, KEY_BLOCK, D]
        vb = _key_block(v, k0, k1)
        s = torch.matmul(qh, kb.transpose(1, 2))  # [Hkv, group*Mp, KEY_BLOCK]
        if k1 > q_start:  # some keys in this block lie after some queries: mask them
            kpos = torch.arange(k0, k1)
            s = s.masked_fill(kpos[None, :] > pos[:, None], float("-inf"))
        new_max = torch.maximum(row_max, s.amax(-1, keepdim=True))
        # rows with every key masked so far keep max -inf: use 0 so exp() gives exact zeros, not NaN
        safe = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        p = torch.exp(s - safe)
        corr = torch.exp(row_max - safe)
        row_sum = row_sum * corr + p.sum(-1, keepdim=True)
        acc = acc * corr + torch.matmul(p, vb)
        row_max = new_max
    res = acc / row_sum  # [Hkv, group*Mp, D]
    return res.view(hkv, group, mp, d).permute(2, 0, 1, 3).reshape(mp, hq, d)[:m]


def _key_block(x: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
    """Keys [k0, k1) as [Hkv, KEY_BLOCK, D] float32, zero-padded past the end of ``x``."""
    n = x.shape[0]
    if k1 <= n:
        return x[k0:k1].float().transpose(0, 1).contiguous()
    blk = torch.zeros((KEY_BLOCK, x.shape[1], x.shape[2]), dtype=torch.float32)
    blk[: n - k0] = x[k0:n]
    return blk.transpose(0, 1).contiguous()
