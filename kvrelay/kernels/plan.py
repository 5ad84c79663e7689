"""Validation shared by every pack/unpack implementation: block ids, token range, head range, buffers.

Owns: turning the public arguments into a checked `CopyPlan` (or a ValueError that names the value,
the limit and the fix) before any implementation touches memory.  Must not touch: tensor contents.

Block ids are checked on the host, where engines keep them (lists, numpy, CPU tensors): planning never
reads device memory.  Ids handed over as a CUDA tensor are copied to the host once for the check,
which waits for that tensor's stream: pass host ids on hot paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch

from kvrelay.kernels.layout import KVLayout

BlockIds = Union[Sequence[int], np.ndarray, torch.Tensor]


@dataclass(frozen=True, slots=True)
class CopyPlan:
    """A checked copy: tokens [token_start, token_end) of the request, model heads [head_start, head_end)."""

    ids: np.ndarray  # int64, 1-D, contiguous, on the host (cuda_path.py uploads it, cached)
    token_start: int
    token_end: int
    head_start: int  # model heads copied (the intersection for unpack)
    head_end: int
    cache_h0: int  # head_start - layout.head_start
    chunk_heads: int  # heads the chunk holds
    chunk_h0: int  # head_start - the chunk's first head
    nbytes: int  # the chunk's length in bytes

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start

    @property
    def num_heads(self) -> int:
        return self.head_end - self.head_start


def block_ids_array(block_ids: BlockIds) -> np.ndarray:
    """The block ids as contiguous int64 on the host (a CUDA tensor is copied once: a sync)."""
    if isinstance(block_ids, torch.Tensor):
        if block_ids.dim() != 1:
            raise ValueError(f"block_ids must be 1-D, got shape {tuple(block_ids.shape)}")
        if block_ids.dtype.is_floating_point or block_ids.dtype.is_complex or block_ids.dtype == torch.bool:
            raise ValueError(f"block_ids must be integers, got dtype {block_ids.dtype}")
        return np.ascontiguousarray(block_ids.detach().cpu().numpy(), dtype=np.int64)
    arr = np.asarray(block_ids)
    if arr.ndim != 1:
        raise ValueError(f"block_ids must be a 1-D sequence, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"block_ids must be integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _check_tokens(layout: KVLayout, ids: np.ndarray, token_start: int, token_end: int) -> None:
    for name, value in (("token_start", token_start), ("token_end", token_end)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if token_start < 0 or token_end <= token_start:
        raise ValueError(f"token range [{token_start}, {token_end}) is empty or negative; "
                         f"pass 0 <= token_start < token_end")
    bs = layout.block_size
    need = -(-token_end // bs)
    if need > len(ids):
        raise ValueError(f"token range [{token_start}, {token_end}) needs {need} blocks of {bs} tokens, but only "
                         f"{len(ids)} block ids were given; allocate more blocks or shorten the range")
    used = ids[token_start // bs: need]
    lo, hi = int(used.min()), int(used.max())
    if lo < 0 or hi >= layout.num_blocks:
        bad = lo if lo < 0 else hi
        raise ValueError(f"block id {bad} out of range: the cache has {layout.num_blocks} blocks (valid ids "
                         f"0..{layout.num_blocks - 1})")


def _check_heads(layout: KVLayout, head_start: int, head_end: int, what: str) -> None:
    for name, value in ((f"{what}head_start", head_start), (f"{what}head_end", head_end)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if head_start < 0 or head_end <= head_start or head_end > layout.total_kv_heads:
        raise ValueError(f"{what}head range [{head_start}, {head_end}) is invalid: it must be non-empty and within "
                         f"the model's {layout.total_kv_heads} KV heads")


def check_buffer(buf: torch.Tensor, nbytes: int, cache_device: torch.device, name: str) -> None:
    """``buf`` must be a contiguous tensor on the CPU or the cache's device with at least ``nbytes`` bytes."""
    if not isinstance(buf, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(buf).__name__}")
    if buf.device.type != "cpu" and buf.device != cache_device:
        raise ValueError(f"{name} is on {buf.device}; it must be on the CPU or on the cache's device {cache_device}")
    if not buf.is_contiguous():
        raise ValueError(f"{name} must be contiguous (got strides {buf.stride()}); pass a contiguous buffer")
    have = buf.numel() * buf.element_size()
    if have < nbytes:
        raise ValueError(f"{name} is too small: {have} bytes, the chunk needs {nbytes}; allocate at least "
                         f"layout.chunk_nbytes(num_tokens, num_heads) bytes")


def plan_pack(layout: KVLayout, block_ids: BlockIds, token_start: int, token_end: int,
              head_start: int | None, head_end: int | None) -> CopyPlan:
    ids = block_ids_array(block_ids)
    _check_tokens(layout, ids, token_start, token_end)
    hs = layout.head_start if head_start is None else head_start
    he = layout.head_end if head_end is None else head_end
    _check_heads(layout, hs, he, "")
    if hs < layout.head_start or he > layout.head_end:
        raise ValueError(f"head range [{hs}, {he}) is not held by this rank, which holds model heads "
                         f"[{layout.head_start}, {layout.head_end}); pick a sub-range of those")
    n = he - hs
    return CopyPlan(ids, int(token_start), int(token_end), hs, he, hs - layout.head_start, n, 0,
                    _chunk_nbytes(layout, token_end - token_start, n))


def plan_unpack(layout: KVLayout, block_ids: BlockIds, token_start: int, token_end: int,
                chunk_head_start: int, chunk_head_end: int) -> CopyPlan:
    ids = block_ids_array(block_ids)
    _check_tokens(layout, ids, token_start, token_end)
    _check_heads(layout, chunk_head_start, chunk_head_end, "chunk_")
    hs, he = max(chunk_head_start, layout.head_start), min(chunk_head_end, layout.head_end)
    if hs >= he:
        raise ValueError(f"chunk heads [{chunk_head_start}, {chunk_head_end}) do not intersect this rank's heads "
                         f"[{layout.head_start}, {layout.head_end}); route the chunk to the rank that holds them")
    ch = chunk_head_end - chunk_head_start
    return CopyPlan(ids, int(token_start), int(token_end), hs, he, hs - layout.head_start, ch, hs - chunk_head_start,
                    _chunk_nbytes(layout, token_end - token_start, ch))


def _chunk_nbytes(layout: KVLayout, tokens: int, heads: int) -> int:
    """``layout.chunk_nbytes`` without allocating a tensor to learn the item size (this runs per call)."""
    return int(layout.num_kv * tokens * heads * layout.head_dim * layout.dtype.itemsize)
