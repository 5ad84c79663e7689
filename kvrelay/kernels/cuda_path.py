"""Pack/unpack on device caches: the stream contract, the device guard, host staging and uploaded ids.

Owns: where and when the Triton kernel runs for a CUDA cache, and what a caller may assume on return
(the contract below, also in `kvrelay.kernels.api`); the per-geometry layer views; the cache of block
ids uploaded to each device.  All CUDA calls go through a `CudaRuntime`, so tests drive the same logic
with a recording fake on CPU.  Must not touch: validation (plan.py), the kernel (triton_kernels.py).

Stream contract:
- Everything runs under ``torch.cuda.device(<the cache's device>)`` on ``stream`` (default: the
  current stream *of the cache's device*, whatever the current device is).  Work the engine enqueued
  earlier on that stream (e.g. the layer's attention) is ordered before the kernel; work on other
  streams is not: pass their stream, or make ours wait on it first.
- A device buffer (``out`` / ``chunk`` on the cache's device): pack and unpack return at once; the
  result is ordered on ``stream``.  Another stream must ``wait_event(done)`` (pass ``done=``, an
  unrecorded ``torch.cuda.Event``) or ``wait_stream(stream)`` before touching it; another process
  (CUDA IPC) must see ``done`` complete.  The caller must not overwrite a chunk being unpacked, from
  another stream, before ``done``.
- A host buffer (pinned or pageable): the bytes go through a device staging buffer on ``stream``.
  Without ``done``, pack returns once ``out`` holds the chunk and unpack once ``chunk`` was copied to
  the device (it may be reused; the scatter itself is still asynchronous).  The wait is on an event
  of ``stream``, never a device-wide sync.  With ``done``, both return at once and the host buffer
  must not be read (pack) or reused (unpack) before ``done.synchronize()``.
- Nothing is read back from the device: block ids are checked on the host (plan.py) and uploaded
  once per distinct list per device (pinned, non-blocking), then reused from a small cache.
- Temporaries are allocated while ``stream`` is current, and tensors of the caller used on a stream
  that is not their current one are ``record_stream``-ed, so the caching allocator never hands their
  memory to other work before the kernel has finished with it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch

from kvrelay.kernels.layout import KVLayout, LayerTensors, LayerView
from kvrelay.kernels.plan import CopyPlan


class CudaRuntime:
    """The CUDA calls the device path makes (tests substitute a recording fake)."""

    def device_of(self, t: torch.Tensor) -> torch.device:
        return t.device

    def is_host(self, t: torch.Tensor) -> bool:
        return t.device.type == "cpu"

    def device_guard(self, device: torch.device) -> AbstractContextManager:
        return torch.cuda.device(device)

    def current_stream(self, device: torch.device) -> Any:
        return torch.cuda.current_stream(device)

    def stream_guard(self, stream: Any) -> AbstractContextManager:
        return torch.cuda.stream(stream)

    def event(self) -> Any:
        return torch.cuda.Event()

    def wait_event(self, stream: Any, event: Any) -> None:
        stream.wait_event(event)

    def record_stream(self, t: torch.Tensor, stream: Any) -> None:
        t.record_stream(stream)

    def empty(self, nbytes: int, device: torch.device) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def upload(self, ids: np.ndarray, device: torch.device) -> torch.Tensor:
        """Host ids to ``device`` on the current stream, from pinned memory, without blocking."""
        return torch.from_numpy(ids).pin_memory().to(device, non_blocking=True)

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src, non_blocking=True)

    def launch(self, view: LayerView, plan: CopyPlan, chunk: torch.Tensor, ids: torch.Tensor, pack: bool) -> None:
        import kvrelay.kernels.triton_kernels as triton_kernels  # lazily: triton's import is slow
        triton_kernels.copy(view, plan, chunk, ids, pack)


CUDA = CudaRuntime()

# ---- layer views: validated once per tensor geometry ------------------------------------------------
# (layout, per-tensor (address, shape, strides, dtype, device)) -> the view's numbers.  No tensor is
# kept (a freed cache is not held alive); the key holds everything `validate_layer` looks at.
_VIEWS: dict[tuple, tuple] = {}
_VIEWS_MAX = 4096


def layer_view(layout: KVLayout, layer: LayerTensors) -> LayerView:
    """``layout.layer_view(layer)``, validating only the first time a tensor geometry is seen."""
    tensors = (layer,) if isinstance(layer, torch.Tensor) else tuple(layer)
    try:
        key = (layout, tuple((t.data_ptr(), t.shape, t.stride(), t.dtype, t.device) for t in tensors))
    except AttributeError:
        raise ValueError(f"layer must be a torch.Tensor or a (K, V) pair of tensors, got {layer!r:.80}") from None
    nums = _VIEWS.get(key)
    if nums is None:
        layout.validate_layer(layer, device=tensors[0].device)
        v = layout.layer_view(layer)
        nums = (v.offsets, v.block_stride, v.token_stride, v.head_stride, v.row_bytes, v.num_blocks,
                v.block_size, v.num_heads, len(v.tensors) == 1)
        if len(_VIEWS) >= _VIEWS_MAX:
            _VIEWS.clear()
        _VIEWS[key] = nums
    offsets, *rest, single = nums
    planes = tensors[:1] if single else (tensors * 2 if len(tensors) == 1 else tensors)
    return LayerView(planes, offsets, *rest)


# ---- block ids on the device ----------------------------------------------------------------------
class IdsCache:
    """Block-id lists uploaded per device: a request's list serves all its layers and chunks."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, tuple[torch.Tensor, Any, Any]] = OrderedDict()
        self.uploads = 0

    def get(self, ids: np.ndarray, device: torch.device, stream: Any, rt: CudaRuntime) -> torch.Tensor:
        key = (device, ids.tobytes())
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
        if hit is None:
            t = rt.upload(ids, device)
            ev = rt.event()
            ev.record(stream)
            with self._lock:
                self.uploads += 1
                self._entries[key] = (t, ev, stream)
                while len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
            return t
        t, ev, home = hit
        if stream != home:  # uploaded on another stream: order after the upload, keep it alive for us
            rt.wait_event(stream, ev)
            rt.record_stream(t, stream)
        return t

    def clear(self) -> None:
        """Drop every entry and zero the upload count."""
        with self._lock:
            self._entries.clear()
            self.uploads = 0


IDS = IdsCache()


def _flat(buf: torch.Tensor, nbytes: int) -> torch.Tensor:
    return buf.reshape(-1).view(torch.uint8)[:nbytes]


def copy(view: LayerView, plan: CopyPlan, buf: torch.Tensor, pack: bool, stream: Any = None, done: Any = None,
         rt: CudaRuntime = CUDA) -> int:
    """Pack (cache -> ``buf``) or unpack (``buf`` -> cache) on a device cache under the contract above."""
    device = rt.device_of(view.tensors[0])
    host = rt.is_host(buf)
    n = plan.nbytes
    with rt.device_guard(device):
        current = rt.current_stream(device)
        s = current if stream is None else stream
        with rt.stream_guard(s):
            ids = IDS.get(plan.ids, device, s, rt)
            if s != current:  # torch hands out a new Stream object per call: compare, not identity
                for t in {id(t): t for t in view.tensors}.values():
                    rt.record_stream(t, s)
                if not host:
                    rt.record_stream(buf, s)
            staged = None
            if pack:
                chunk = rt.empty(n, device) if host else buf
                rt.launch(view, plan, chunk, ids, True)
                if host:
                    rt.copy_async(_flat(buf, n), chunk)
                    staged = rt.event() if done is None else None
                    if staged is not None:
                        staged.record(s)
            else:
                chunk = buf
                if host:
                    chunk = rt.empty(n, device)
                    rt.copy_async(chunk, _flat(buf, n))
                    staged = rt.event() if done is None else None
                    if staged is not None:
                        staged.record(s)
                rt.launch(view, plan, chunk, ids, False)
            if done is not None:
                done.record(s)
    if staged is not None:  # the host buffer is ready (pack) or free again (unpack): this stream only
        staged.synchronize()
    return n
