"""`pack` and `unpack`: the public entry points, which validate and dispatch to one implementation.

Owns: the argument contract (see the docstrings), dispatch (CUDA tensors -> Triton, CPU tensors -> the
native library; ``impl=`` forces "native", "triton" or "torch", the last being the reference), and
staging when the chunk buffer and the cache live on different devices.  Must not touch: transports,
the store, checksums (transfer/wire.py).
"""

from __future__ import annotations

from typing import Literal

import torch

from kvrelay.kernels import native, reference
from kvrelay.kernels.layout import KVLayout, LayerTensors
from kvrelay.kernels.plan import BlockIds, CopyPlan, check_buffer, plan_pack, plan_unpack

Impl = Literal["native", "triton", "torch"]
IMPLS = ("native", "triton", "torch")


def _cache_device(layer: LayerTensors) -> torch.device:
    t = layer if isinstance(layer, torch.Tensor) else layer[0]
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"layer must be a torch.Tensor or a (K, V) pair of tensors, got {type(t).__name__}")
    return t.device


def _choose(impl: str | None, device: torch.device) -> str:
    if impl is None:
        return "native" if device.type == "cpu" else "triton"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)} (or None to choose by device), got {impl!r}")
    if impl == "native" and device.type != "cpu":
        raise ValueError(f"impl='native' needs a CPU cache, the cache is on {device}; use impl='triton'")
    return impl


def _validate(impl: str, layout: KVLayout, layer: LayerTensors, device: torch.device) -> None:
    if impl == "native":
        native.geometry(layout, layer)  # validates once per distinct tensor geometry (cached)
    else:
        layout.validate_layer(layer, device=device)


def _run(impl: str, layout: KVLayout, layer: LayerTensors, plan: CopyPlan, chunk: torch.Tensor, pack_: bool) -> int:
    if impl == "torch":
        return reference.pack(layout, layer, plan, chunk) if pack_ else reference.unpack(layout, layer, plan, chunk)
    if impl == "native":
        return native.copy(layout, layer, plan, chunk, pack_)
    from kvrelay.kernels import triton_kernels  # imported lazily: triton's import is slow
    return triton_kernels.copy(layout.layer_view(layer), plan, chunk, pack_)


def pack(layout: KVLayout, layer: LayerTensors, block_ids: BlockIds, token_start: int, token_end: int,
         out: torch.Tensor, head_start: int | None = None, head_end: int | None = None, *,
         impl: str | None = None) -> int:
    """Gather request tokens [token_start, token_end) of one layer into ``out`` in canonical order.

    ``out`` receives ``[kv, tokens, heads, head_dim]`` for model heads [head_start, head_end) (default:
    this rank's slice; must lie within it).  Request token t lives at block ``block_ids[t //
    block_size]``, slot ``t % block_size``.  ``out`` is any contiguous tensor on the CPU or the cache's
    device with at least ``layout.chunk_nbytes(tokens, heads)`` bytes.  Returns the bytes written.
    Raises ValueError, before writing anything, on any bad argument.
    """
    device = _cache_device(layer)
    chosen = _choose(impl, device)
    _validate(chosen, layout, layer, device)
    plan = plan_pack(layout, block_ids, token_start, token_end, device, head_start, head_end)
    check_buffer(out, plan.nbytes, device, "out")
    if chosen != "torch" and out.device != device:  # e.g. a CUDA cache packed into pinned host memory
        staging = torch.empty(plan.nbytes, dtype=torch.uint8, device=device)
        n = _run(chosen, layout, layer, plan, staging, True)
        out.reshape(-1).view(torch.uint8)[:n].copy_(staging)
        return n
    return _run(chosen, layout, layer, plan, out, True)


def unpack(layout: KVLayout, layer: LayerTensors, block_ids: BlockIds, token_start: int, token_end: int,
           chunk: torch.Tensor, chunk_head_start: int, chunk_head_end: int, *, impl: str | None = None) -> int:
    """Scatter a canonical chunk holding model heads [chunk_head_start, chunk_head_end) into the cache.

    Writes the intersection with this rank's heads; block size, order and head slice may differ from
    the sender's.  Returns the chunk's length in bytes (``layout.chunk_nbytes(tokens, chunk heads)``),
    so callers can step through a buffer of consecutive chunks.  Raises ValueError, before writing
    anything, on any bad argument, including head ranges that do not intersect.
    """
    device = _cache_device(layer)
    chosen = _choose(impl, device)
    _validate(chosen, layout, layer, device)
    plan = plan_unpack(layout, block_ids, token_start, token_end, device, chunk_head_start, chunk_head_end)
    check_buffer(chunk, plan.nbytes, device, "chunk")
    if chosen != "torch" and chunk.device != device:
        chunk = chunk.reshape(-1).view(torch.uint8)[: plan.nbytes].to(device, non_blocking=False)
    return _run(chosen, layout, layer, plan, chunk, False)
