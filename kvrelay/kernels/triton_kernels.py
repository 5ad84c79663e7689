"""Triton pack/unpack kernel for device caches (and CPU tensors through Triton's interpreter).

Owns: one gather/scatter kernel over the canonical chunk, launched once per call (the K/V plane is the
grid's third axis), and the host-side preparation of its arguments.  Tensors are reinterpreted as the
widest integer word (8, 4, 2 or 1 bytes) that divides the row, every stride and offset and the base
addresses, so every dtype (fp8 included) moves as exact bits.  Must not touch: validation (plan.py
did it), devices and streams (cuda_path.py chose them), or memory outside the given tensors.

Each program copies BLOCK_T tokens x BLOCK_W words of one head row of one plane; request token t lives
at block ``ids[t // block_size]``, slot ``t % block_size``.  Per-token bases are int64 (a layer may
exceed 2**31 elements); offsets within a row are int32, added last.  BLOCK_W is the largest power of
two dividing the row (no masked lanes: MLA's 576-wide bf16 row is 9 tiles of 16 words), so with
specialised strides the loads are 16-byte vectors.

Recompiles: Triton compiles one binary per distinct specialisation key.  The arguments that change per
request (token start and count, head offsets, the chunk's heads and plane size) are in
``DO_NOT_SPECIALIZE``, so only a new layout (strides, block size, row width) or a chunk pointer that
is / is not 16-byte aligned compiles again.  CPU tensors run the same kernel through
`triton.runtime.interpreter.InterpretedFunction` (exact, about 0.7 ms per program: small caches
only), whatever TRITON_INTERPRET says; CUDA tensors always run the compiled JITFunction.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton.language as tl
from triton.runtime.jit import JITFunction, TensorWrapper

from kvrelay.kernels.layout import LayerView
from kvrelay.kernels.plan import CopyPlan

_WORDS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
# Per-request integers: never specialised (a new value must not compile a new binary mid-traffic).
DO_NOT_SPECIALIZE = ("token_start", "num_tokens", "cache_h0", "chunk_h0", "chunk_heads", "plane_rows")
TILE_WORDS = 2048  # words per program on a GPU (16 KiB of int64): ~50 registers per thread at 4 warps
MAX_BLOCK_W = 256


def _kv_copy(cache0_ptr, cache1_ptr, chunk_ptr, ids_ptr,
             plane0_off, plane1_off, block_stride, token_stride, head_stride, block_size, num_blocks, row_words,
             token_start, num_tokens, cache_h0, chunk_h0, chunk_heads, plane_rows,
             PACK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_hw = tl.program_id(1)
    kv = tl.program_id(2)
    row_tiles = (row_words + BLOCK_W - 1) // BLOCK_W  # not tl.cdiv: a jit helper the interpreter refuses
    head = pid_hw // row_tiles
    w0 = (pid_hw % row_tiles) * BLOCK_W
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tok = token_start + offs_t
    blk = tl.load(ids_ptr + tok // block_size, mask=offs_t < num_tokens, other=0).to(tl.int64)
    # a block id changed on the device after validation is skipped, never followed out of the cache
    mask_t = (offs_t < num_tokens) & (blk >= 0) & (blk < num_blocks)
    cache_row = blk * block_stride + (tok % block_size).to(tl.int64) * token_stride  # [BLOCK_T] int64
    chunk_row = offs_t.to(tl.int64) * chunk_heads * row_words  # [BLOCK_T] int64
    if kv == 0:
        cache_base = cache0_ptr + plane0_off
    else:
        cache_base = cache1_ptr + plane1_off
    cache_base += (cache_h0 + head).to(tl.int64) * head_stride + w0
    chunk_base = chunk_ptr + kv.to(tl.int64) * plane_rows * row_words + (chunk_h0 + head).to(tl.int64) * row_words + w0
    words = tl.arange(0, BLOCK_W)  # int32 within the row
    mask = mask_t[:, None] & ((w0 + words) < row_words)[None, :]
    cache_p = cache_base + cache_row[:, None] + words[None, :]
    chunk_p = chunk_base + chunk_row[:, None] + words[None, :]
    if PACK:
        tl.store(chunk_p, tl.load(cache_p, mask=mask), mask=mask)
    else:
        tl.store(cache_p, tl.load(chunk_p, mask=mask), mask=mask)


# A JITFunction built directly (not `triton.jit`), so TRITON_INTERPRET=1 in the environment never turns
# the CUDA path into the interpreter.
kv_copy_jit: JITFunction = JITFunction(_kv_copy, do_not_specialize=list(DO_NOT_SPECIALIZE))


@functools.cache
def _kv_copy_interpreted():
    from triton.runtime.interpreter import InterpretedFunction
    return InterpretedFunction(_kv_copy, do_not_specialize=list(DO_NOT_SPECIALIZE))


def word_size(view: LayerView, chunk_ptr: int) -> int:
    values = [view.row_bytes, view.block_stride, view.token_stride, view.head_stride, *view.offsets,
              chunk_ptr, *(t.data_ptr() for t in view.tensors)]
    for w in (8, 4, 2):
        if all(v % w == 0 for v in values):
            return w
    return 1


def _as_words(t: torch.Tensor, w: int) -> torch.Tensor:
    """The whole storage span of ``t`` from its first element, as a flat tensor of w-byte words."""
    nbytes = (sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)) + 1) * t.element_size()
    flat = torch.as_strided(t, (nbytes // t.element_size(),), (1,))
    return flat.view(torch.uint8).view(_WORDS[w]) if w != 1 or t.dtype != torch.uint8 else flat


def block_w(row_words: int) -> int:
    """Words per program along a row: the largest power of two dividing it (no masked lanes) when that
    is at least 16 or the whole row, else the row rounded up to a power of two (masked tail)."""
    p = 1
    while row_words % (2 * p) == 0 and 2 * p <= MAX_BLOCK_W:
        p *= 2
    if p >= min(16, row_words):
        return p
    return min(_pow2(row_words), MAX_BLOCK_W)


@dataclass(frozen=True, slots=True)
class Launch:
    """Everything one kernel launch takes, prepared on the host (no device work, no sync)."""

    grid: tuple[int, int, int]
    args: tuple
    block_t: int
    block_w: int
    word: int


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def prepare(view: LayerView, plan: CopyPlan, chunk: torch.Tensor, ids: torch.Tensor, pack: bool,
            interpret: bool = False, block_t: int | None = None) -> Launch:
    """The launch for a pack (cache -> chunk) or unpack (chunk -> cache); ``ids`` on the cache's device.

    On a GPU the tensors are passed as `TensorWrapper`s (Triton's `reinterpret`: the same address read
    as words), which costs far less host time per call than building word views."""
    w = word_size(view, chunk.data_ptr())
    row_words = view.row_bytes // w
    bw = block_w(row_words)
    T = plan.num_tokens
    if interpret:  # few, large programs: the interpreter pays per program, not per element
        bw = min(_pow2(row_words), 4096)
        bt = block_t or min(_pow2(T), max(1, 8192 // bw))
        chunk_words = chunk.reshape(-1).view(torch.uint8)[: plan.nbytes].view(_WORDS[w])
        planes = [_as_words(t, w) for t in view.tensors]
    else:
        bt = block_t or max(1, min(128, TILE_WORDS // bw))
        chunk_words = TensorWrapper(chunk, _WORDS[w])
        planes = [TensorWrapper(t, _WORDS[w]) for t in view.tensors]
    grid = (-(-T // bt), plan.num_heads * -(-row_words // bw), len(view.offsets))
    args = (planes[0], planes[-1], chunk_words, ids, view.offsets[0] // w, view.offsets[-1] // w,
            view.block_stride // w, view.token_stride // w, view.head_stride // w, view.block_size, view.num_blocks,
            row_words, plan.token_start, T, plan.cache_h0, plan.chunk_h0, plan.chunk_heads, plan.chunk_heads * T)
    return Launch(grid, args, bt, bw, w)


def launch_options(prep: Launch, pack: bool) -> dict:
    """The kernel's keyword arguments on a GPU (no float math: FP fusion off, which also keeps Triton 3.9
    from warning that its default changes)."""
    return dict(PACK=pack, BLOCK_T=prep.block_t, BLOCK_W=prep.block_w, enable_fp_fusion=False)


def launch(prep: Launch, pack: bool, interpret: bool = False) -> None:
    if interpret:
        _kv_copy_interpreted()[prep.grid](*prep.args, PACK=pack, BLOCK_T=prep.block_t, BLOCK_W=prep.block_w)
    else:
        kv_copy_jit[prep.grid](*prep.args, **launch_options(prep, pack))


def copy(view: LayerView, plan: CopyPlan, chunk: torch.Tensor, ids: torch.Tensor, pack: bool,
         block_t: int | None = None) -> int:
    """Pack or unpack with the kernel on the current device and stream (the caller set both);
    ``chunk`` and ``ids`` on the cache's device.  CPU tensors run through the interpreter."""
    interpret = view.tensors[0].device.type == "cpu"
    launch(prepare(view, plan, chunk, ids, pack, interpret, block_t), pack, interpret)
    return plan.nbytes
