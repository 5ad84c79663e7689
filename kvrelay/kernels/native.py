"""The fast CPU pack/unpack path: a checked plan handed to the native library (csrc/kvcopy.c).

Owns: reducing a `LayerView` and a `CopyPlan` to the addresses, extents and strides `_native.copy`
takes, and the native pool settings.  The C side merges contiguous runs into memcpy calls, splits the
work over its persistent threads with the GIL released, and re-checks every bound before writing.
Must not touch: validation policy (plan.py) or other devices' tensors.
"""

from __future__ import annotations

import os
from typing import NoReturn

import numpy as np
import torch

from kvrelay.kernels.layout import KVLayout, LayerTensors
from kvrelay.kernels.plan import CopyPlan


class _Missing:
    """Stands in for the library when it is not built: every call raises, naming the fix."""

    def __init__(self, exc: ImportError) -> None:
        self.exc = exc

    def __getattr__(self, name: str) -> NoReturn:
        raise ImportError(f"the native library kvrelay._native is not built ({self.exc}); run "
                          f"`pip install --no-deps -e .` in the repository (needs cmake and a C compiler)")


try:
    from kvrelay import _native
except ImportError as _exc:  # layouts, the reference and Triton still work; the native calls explain the fix
    _native = _Missing(_exc)  # type: ignore[assignment]  # a stand-in for the module, which mypy cannot name

_threads_env = os.environ.get("KVRELAY_NATIVE_THREADS")
if _threads_env:
    try:
        _native.set_num_threads(int(_threads_env))
    except ValueError as exc:
        raise ValueError(f"KVRELAY_NATIVE_THREADS={_threads_env!r} is invalid: {exc}") from None


def set_num_threads(n: int) -> None:
    """Size of the native copy pool (threads including the caller; default 2 or $KVRELAY_NATIVE_THREADS)."""
    _native.set_num_threads(int(n))


def get_num_threads() -> int:
    return _native.get_num_threads()


def set_parallel_threshold(nbytes: int) -> None:
    """Copies smaller than ``nbytes`` (default 1 MiB) run on the calling thread alone."""
    _native.set_parallel_threshold(int(nbytes))


def set_stream_threshold(nbytes: int) -> None:
    """Copies of at least ``nbytes`` (default 16 MiB) write with non-temporal stores, bypassing the cache:
    faster for data far larger than the cache, slower when the result is read again at once."""
    _native.set_stream_threshold(int(nbytes))


def set_backoff(seconds: float) -> None:
    """When a pool worker lags (preempted on busy cores), copies run on the caller alone for this long
    (default 0.05 s); 0 disables backing off (every large copy uses the pool)."""
    _native.set_backoff_ns(int(seconds * 1e9))


def backoffs() -> int:
    """How many times the pool backed off since the process started."""
    return _native.get_backoffs()


def get_stream_threshold() -> int:
    return _native.get_stream_threshold()


def _extent(t: torch.Tensor) -> int:
    """Bytes addressable from ``t.data_ptr()`` (the tensor's span; strides are non-negative here)."""
    if t.numel() == 0:
        return 0
    return (sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)) + 1) * t.element_size()


# (layout, per-tensor (address, shape, strides, dtype, device)) -> the geometry ints `_native.copy` takes.
# Only numbers are kept (no tensor references, so nothing stays alive); the key holds everything
# `KVLayout.validate_layer` looks at, so a hit is a layer that was already validated.
_GEOMETRY: dict[tuple, tuple[int, ...]] = {}
_GEOMETRY_MAX = 4096


def geometry(layout: KVLayout, layer: LayerTensors) -> tuple[int, ...]:
    """Validate ``layer`` against ``layout`` (once per distinct tensor geometry) and reduce it to ints."""
    tensors = (layer,) if isinstance(layer, torch.Tensor) else tuple(layer)
    try:
        key = (layout, tuple((t.data_ptr(), t.shape, t.stride(), t.dtype, t.device) for t in tensors))
    except AttributeError:
        raise ValueError(f"layer must be a torch.Tensor or a (K, V) pair of tensors, got {layer!r:.80}") from None
    geo = _GEOMETRY.get(key)
    if geo is not None:
        return geo
    layout.validate_layer(layer, device=tensors[0].device)
    view = layout.layer_view(layer)
    if any(t.device.type != "cpu" for t in view.tensors):
        raise ValueError("the native path takes CPU tensors only; use impl='triton' for device tensors")
    t0, t1 = view.tensors[0], view.tensors[-1]
    geo = (t0.data_ptr(), _extent(t0), view.offsets[0], t1.data_ptr(), _extent(t1), view.offsets[-1],
           len(view.offsets), view.block_stride, view.token_stride, view.head_stride, view.row_bytes,
           view.num_blocks, view.block_size, view.num_heads)
    if len(_GEOMETRY) >= _GEOMETRY_MAX:
        _GEOMETRY.clear()
    _GEOMETRY[key] = geo
    return geo


def copy(layout: KVLayout, layer: LayerTensors, plan: CopyPlan, chunk: torch.Tensor, pack: bool) -> int:
    """Run one pack (cache -> chunk) or unpack (chunk -> cache) on CPU tensors."""
    if chunk.device.type != "cpu":
        raise ValueError(f"the native path needs a CPU chunk buffer, got one on {chunk.device}")
    geo = geometry(layout, layer)
    ids = plan.ids
    if not isinstance(ids, np.ndarray):
        raise ValueError(f"the native path needs a CPU plan (block ids in numpy), got ids on {ids.device}")
    _native.copy(1 if pack else 0, *geo, ids.ctypes.data, len(ids), plan.token_start, plan.token_end,
                 plan.cache_h0, plan.num_heads, chunk.data_ptr(), chunk.numel() * chunk.element_size(),
                 plan.chunk_heads, plan.chunk_h0)
    return plan.nbytes
