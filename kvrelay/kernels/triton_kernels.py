"""Triton pack/unpack kernels for device caches (and CPU tensors through Triton's interpreter).

Owns: one gather/scatter kernel over the canonical chunk, launched once per K/V plane.  Tensors are
reinterpreted as the widest integer word (8, 4, 2 or 1 bytes) that divides the row, every stride and
offset and the base addresses, so every dtype (fp8 included) moves as exact bits.  Must not touch:
validation (plan.py did it) or memory outside the given tensors.

Each program copies BLOCK_T tokens x BLOCK_E words of one plane; request token t lives at block
``ids[t // block_size]``, slot ``t % block_size``.  CPU tensors run the same kernel through
`triton.runtime.interpreter.InterpretedFunction` (exact, about 0.7 ms per program: small caches only),
whatever TRITON_INTERPRET says, so the interpreter does not depend on import order.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kvrelay.kernels.layout import LayerView
from kvrelay.kernels.plan import CopyPlan

_WORDS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def _kv_copy(cache_ptr, chunk_ptr, ids_ptr, plane_off, block_stride, token_stride, head_stride,
             token_start, num_tokens, block_size, chunk_kv_off, chunk_heads, chunk_h0, cache_h0,
             num_words, row_words, PACK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_e = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_t = offs_t < num_tokens
    tok = (token_start + offs_t).to(tl.int64)
    blk = tl.load(ids_ptr + tok // block_size, mask=mask_t, other=0).to(tl.int64)
    slot = tok % block_size
    head = offs_e // row_words
    word = offs_e % row_words
    cache_off = (plane_off + blk * block_stride + slot * token_stride)[:, None] + \
        ((cache_h0 + head).to(tl.int64) * head_stride + word)[None, :]
    chunk_off = chunk_kv_off + (offs_t.to(tl.int64) * chunk_heads * row_words)[:, None] + \
        ((chunk_h0 + head).to(tl.int64) * row_words + word)[None, :]
    mask = mask_t[:, None] & (offs_e < num_words)[None, :]
    if PACK:
        vals = tl.load(cache_ptr + cache_off, mask=mask)
        tl.store(chunk_ptr + chunk_off, vals, mask=mask)
    else:
        vals = tl.load(chunk_ptr + chunk_off, mask=mask)
        tl.store(cache_ptr + cache_off, vals, mask=mask)


_kv_copy_jit = triton.jit(_kv_copy)


@functools.cache
def _kv_copy_interpreted():
    from triton.runtime.interpreter import InterpretedFunction
    return InterpretedFunction(_kv_copy)


def _word_size(view: LayerView, chunk: torch.Tensor) -> int:
    values = [view.row_bytes, view.block_stride, view.token_stride, view.head_stride, *view.offsets,
              chunk.data_ptr(), *(t.data_ptr() for t in view.tensors)]
    for w in (8, 4, 2):
        if all(v % w == 0 for v in values):
            return w
    return 1


def _as_words(t: torch.Tensor, w: int) -> torch.Tensor:
    """The whole storage span of ``t`` from its first element, as a flat tensor of w-byte words."""
    nbytes = (sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)) + 1) * t.element_size()
    flat = torch.as_strided(t, (nbytes // t.element_size(),), (1,))
    return flat.view(torch.uint8).view(_WORDS[w]) if w != 1 or t.dtype != torch.uint8 else flat


def copy(view: LayerView, plan: CopyPlan, chunk: torch.Tensor, pack: bool,
         block_t: int | None = None) -> int:
    """Pack (cache -> chunk) or unpack (chunk -> cache) with the Triton kernel; chunk on the cache's device."""
    device = view.tensors[0].device
    interpret = device.type == "cpu"
    kernel = _kv_copy_interpreted() if interpret else _kv_copy_jit
    w = _word_size(view, chunk)
    row_words = view.row_bytes // w
    num_words = plan.num_heads * row_words
    chunk_words = chunk.reshape(-1).view(torch.uint8)[: plan.nbytes].view(_WORDS[w])
    ids = plan.ids if isinstance(plan.ids, torch.Tensor) else torch.from_numpy(plan.ids)
    ids = ids.to(device)
    T = plan.num_tokens
    if interpret:  # few, large programs: the interpreter pays per program, not per element
        block_e = triton.next_power_of_2(num_words)
        block_t = block_t or min(triton.next_power_of_2(T), max(1, 4096 // block_e))
    else:
        block_e = min(triton.next_power_of_2(num_words), 1024)
        block_t = block_t or max(1, min(16, 4096 // block_e))
    grid = (triton.cdiv(T, block_t), triton.cdiv(num_words, block_e))
    plane_words = row_words * plan.chunk_heads * T
    for kv, (t, off) in enumerate(zip(view.tensors, view.offsets, strict=True)):
        cache_words = _as_words(t, w)
        kernel[grid](cache_words, chunk_words, ids, off // w, view.block_stride // w, view.token_stride // w,
                     view.head_stride // w, plan.token_start, T, view.block_size, kv * plane_words,
                     plan.chunk_heads, plan.chunk_h0, plan.cache_h0, num_words, row_words,
                     PACK=pack, BLOCK_T=block_t, BLOCK_E=block_e)
    return plan.nbytes
