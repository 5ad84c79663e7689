"""`pack` and `unpack`: the public entry points, which validate and dispatch to one implementation.

Owns: the argument contract (see the docstrings), dispatch (CUDA tensors -> Triton, CPU tensors -> the
native library; ``impl=`` forces "native", "triton" or "torch", the last being the reference), and
staging when the chunk buffer and the cache live on different devices.  Must not touch: transports,
the store, checksums (transfer/wire.py).

CUDA caches (the stream contract; cuda_path.py implements it): the kernel runs on the cache's device
(a guard, whatever the current device is) on ``stream=`` (default: that device's current stream), and
nothing reads device memory back.  Device buffers: pack/unpack return at once, the result ordered on
that stream; pass ``done=torch.cuda.Event()`` and have other streams ``wait_event(done)`` (other
processes: ``done.synchronize()``) before they touch the buffer.  Host buffers (pinned or not):
without ``done`` pack returns when ``out`` holds the chunk and unpack when ``chunk`` may be reused;
with ``done`` both return at once and the host buffer is off limits until ``done.synchronize()``.
CPU caches: everything is done on return; ``stream`` and ``done`` must be None.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

# each submodule by its full name, never through the package: kvrelay/kernels/__init__.py imports this module
import kvrelay.kernels.cuda_path as cuda_path
import kvrelay.kernels.native as native
import kvrelay.kernels.reference as reference
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
    elif impl == "triton":
        cuda_path.layer_view(layout, layer)  # likewise
    else:
        layout.validate_layer(layer, device=device)


def _check_stream_args(device: torch.device, stream: Any, done: Any) -> None:
    if device.type != "cuda" and (stream is not None or done is not None):
        raise ValueError(f"stream= and done= apply to CUDA caches; this cache is on {device}, where pack and "
                         f"unpack are complete on return: pass stream=None, done=None")


def _run(impl: str, layout: KVLayout, layer: LayerTensors, plan: CopyPlan, buf: torch.Tensor, pack_: bool,
         stream: Any = None, done: Any = None) -> int:
    """One copy; ``buf`` may be on the host for a device cache (triton stages it, see the contract)."""
    device = _cache_device(layer)
    if impl == "triton" and device.type == "cuda":
        return cuda_path.copy(cuda_path.layer_view(layout, layer), plan, buf, pack_, stream, done)
    if buf.device != device:  # the reference on a device cache with a host buffer, or a foreign device
        if pack_:
            staging = torch.empty(plan.nbytes, dtype=torch.uint8, device=device)
            n = _run(impl, layout, layer, plan, staging, True)
            buf.reshape(-1).view(torch.uint8)[:n].copy_(staging)
            return n
        buf = buf.reshape(-1).view(torch.uint8)[: plan.nbytes].to(device)
    if impl == "torch":
        return reference.pack(layout, layer, plan, buf) if pack_ else reference.unpack(layout, layer, plan, buf)
    if impl == "native":
        return native.copy(layout, layer, plan, buf, pack_)
    import kvrelay.kernels.triton_kernels as triton_kernels  # imported lazily: triton's import is slow
    ids = torch.from_numpy(plan.ids)  # a CPU cache: the kernel runs through Triton's interpreter
    return triton_kernels.copy(cuda_path.layer_view(layout, layer), plan, buf, ids, pack_)


def pack(layout: KVLayout, layer: LayerTensors, block_ids: BlockIds, token_start: int, token_end: int,
         out: torch.Tensor, head_start: int | None = None, head_end: int | None = None, *,
         impl: str | None = None, stream: Any = None, done: Any = None) -> int:
    """Gather request tokens [token_start, token_end) of one layer into ``out`` in canonical order.

    ``out`` receives ``[kv, tokens, heads, head_dim]`` for model heads [head_start, head_end) (default:
    this rank's slice; must lie within it).  Request token t lives at block ``block_ids[t //
    block_size]``, slot ``t % block_size``.  ``out`` is any contiguous tensor on the CPU or the cache's
    device with at least ``layout.chunk_nbytes(tokens, heads)`` bytes.  Returns the bytes written.
    Raises ValueError, before writing anything, on any bad argument.  On a CUDA cache the kernel
    runs on ``stream`` and records ``done`` (see the module's stream contract).
    """
    device = _cache_device(layer)
    chosen = _choose(impl, device)
    _check_stream_args(device, stream, done)
    _validate(chosen, layout, layer, device)
    plan = plan_pack(layout, block_ids, token_start, token_end, head_start, head_end)
    check_buffer(out, plan.nbytes, device, "out")
    return _run(chosen, layout, layer, plan, out, True, stream, done)


def unpack(layout: KVLayout, layer: LayerTensors, block_ids: BlockIds, token_start: int, token_end: int,
           chunk: torch.Tensor, chunk_head_start: int, chunk_head_end: int, *, impl: str | None = None,
           stream: Any = None, done: Any = None) -> int:
    """Scatter a canonical chunk holding model heads [chunk_head_start, chunk_head_end) into the cache.

    Writes the intersection with this rank's heads; block size, order and head slice may differ from
    the sender's.  Returns the chunk's length in bytes (``layout.chunk_nbytes(tokens, chunk heads)``),
    so callers can step through a buffer of consecutive chunks.  Raises ValueError, before writing
    anything, on any bad argument, including head ranges that do not intersect.  On a CUDA cache the
    kernel runs on ``stream`` and records ``done`` (see the module's stream contract).
    """
    device = _cache_device(layer)
    chosen = _choose(impl, device)
    _check_stream_args(device, stream, done)
    _validate(chosen, layout, layer, device)
    plan = plan_unpack(layout, block_ids, token_start, token_end, chunk_head_start, chunk_head_end)
    check_buffer(chunk, plan.nbytes, device, "chunk")
    return _run(chosen, layout, layer, plan, chunk, False, stream, done)
