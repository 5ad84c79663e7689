"""Benchmark suite `kernels`: pack/unpack GB/s against a memcpy of the same bytes, measured in the same run.

Owns: the Llama-3-8B-like workload (8 KV heads, head dim 128, block 16, bf16, vLLM GPU layout NHD
fused ``[2, num_blocks, 16, 8, 128]``, a request's blocks scattered over a cache 25% larger than it)
and its timing.  Cases: ``pack`` and ``unpack``, metric ``GB/s`` (payload bytes per second), baseline
``memcpy`` (``Tensor.copy_`` of the same bytes between preallocated buffers, timed interleaved with
the kernels so background load hits both alike).  ``layers=1`` moves one layer per call; ``layers=32``
moves all 32 layers (one call per layer, buffers far larger than the caches).  On CUDA the same
workload runs the Triton kernels and is reported against the device's peak memory bandwidth
(read + write traffic).  Case ``triton_host_prep`` (us per call, lower is better): the host work of one
small device pack before its launch (plan, layer view, uploaded ids, launch arguments), measured on CPU
tensors, against baseline ``validate_each_call`` (the same with the layer validated and the ids converted
on every call, as before issue 14, not counting the device readback that path also paid).
Must not touch: the kernels themselves.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from kvrelay.bench.harness import BenchContext, Record, median
from kvrelay.kernels import KVLayout, cuda_path, get_num_threads, native, pack, unpack
from kvrelay.kernels.device import device_peak_gbps
from kvrelay.kernels.layout import LayerView
from kvrelay.kernels.plan import CopyPlan, plan_pack


def llama_layout(num_layers: int, num_blocks: int) -> KVLayout:
    """A Llama-3-8B-like cache: 8 KV heads, head dim 128, block 16, bf16, NHD fused."""
    return KVLayout(num_layers=num_layers, num_blocks=num_blocks, block_size=16, num_kv_heads=8, head_dim=128,
                    dtype=torch.bfloat16)


@dataclass
class Workload:
    layout: KVLayout
    layers: list[torch.Tensor]
    ids: np.ndarray
    chunks: list[torch.Tensor]  # one per layer: the packed output / unpack input
    dst: list[torch.Tensor]  # memcpy baseline: chunks -> dst, the same bytes in the same number of calls
    tokens: int

    @property
    def nbytes(self) -> int:
        return sum(c.numel() for c in self.chunks)


def make_workload(tokens: int, layers: int, device: str = "cpu", seed: int = 0) -> Workload:
    need = -(-tokens // 16)  # blocks of 16 tokens
    num_blocks = need + need // 4 + 1
    layout = llama_layout(layers, num_blocks)
    cache = [torch.empty(layout.tensor_shape(), dtype=layout.dtype, device=device) for _ in range(layers)]
    for t in cache:
        t.view(torch.uint8).fill_(0x3C)  # touch every page before timing
    ids = np.random.default_rng(seed).permutation(num_blocks)[:need]
    nbytes = layout.chunk_nbytes(tokens)

    def buf(fill: int) -> torch.Tensor:
        return torch.full((nbytes,), fill, dtype=torch.uint8, device=device)

    return Workload(layout, cache, ids, [buf(1) for _ in range(layers)], [buf(2) for _ in range(layers)], tokens)


def _ops(w: Workload, impl: str | None) -> dict[str, Callable[[], None]]:
    n = w.tokens
    h = w.layout.num_kv_heads

    def memcpy() -> None:  # Tensor.copy_ (may use torch's intra-op threads)
        for s, d in zip(w.chunks, w.dst, strict=True):
            d.copy_(s)

    def memmove() -> None:  # libc memmove on one thread
        for s, d in zip(w.chunks, w.dst, strict=True):
            ctypes.memmove(d.data_ptr(), s.data_ptr(), s.numel())

    def do_pack() -> None:
        for layer, out in zip(w.layers, w.chunks, strict=True):
            pack(w.layout, layer, w.ids, 0, n, out, impl=impl)

    def do_unpack() -> None:
        for layer, chunk in zip(w.layers, w.chunks, strict=True):
            unpack(w.layout, layer, w.ids, 0, n, chunk, 0, h, impl=impl)

    ops = {"memcpy": memcpy, "pack": do_pack, "unpack": do_unpack}
    if w.chunks[0].device.type == "cpu":
        ops["memmove"] = memmove
    return ops


def measure(w: Workload, repeat: int, impl: str | None = None, sync: Callable[[], None] = lambda: None
            ) -> dict[str, float]:
    """Median seconds per op (and the fastest run, as "<op>/best"), the ops interleaved round-robin
    after one warm-up each, so background load hits every op alike."""
    ops = _ops(w, impl)
    times: dict[str, list[float]] = {k: [] for k in ops}
    for fn in ops.values():
        fn()
    sync()
    for _ in range(repeat):
        for name, fn in ops.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {**{k: median(v) for k, v in times.items()}, **{f"{k}/best": min(v) for k, v in times.items()}}


def cpu_records(w: Workload, secs: dict[str, float], layers: int) -> list[Record]:
    """The baseline is the faster of Tensor.copy_ and single-threaded libc memmove in this run (medians);
    params also carry ``best_ratio``: fastest run vs fastest baseline run (less sensitive to load)."""
    fastest = min(("memcpy", "memmove"), key=lambda k: secs[k])
    best_base = min(secs["memcpy/best"], secs["memmove/best"])
    base = w.nbytes / secs[fastest] / 1e9
    params = dict(tokens=w.tokens, layers=layers, device="cpu", threads=get_num_threads(), order="NHD",
                  block_size=16, kv_heads=8, head_dim=128, dtype="bfloat16", bytes=w.nbytes,
                  baseline_impl="Tensor.copy_" if fastest == "memcpy" else "libc memmove (1 thread)",
                  copy_gbps=round(w.nbytes / secs["memcpy"] / 1e9, 3),
                  memmove_gbps=round(w.nbytes / secs["memmove"] / 1e9, 3), pool_backoffs=native.backoffs())
    return [Record.compare("kernels", case, "GB/s", w.nbytes / secs[case] / 1e9, "GB/s", "memcpy", base,
                           {**params, "best_ratio": round(best_base / secs[f"{case}/best"], 3)})
            for case in ("pack", "unpack")]


def cuda_records(w: Workload, secs: dict[str, float], layers: int) -> list[Record]:
    peak, source = device_peak_gbps()
    params = dict(tokens=w.tokens, layers=layers, device=torch.cuda.get_device_name(), peak_source=source,
                  traffic="read+write", bytes=w.nbytes)
    out = []
    for case in ("memcpy", "pack", "unpack"):
        traffic = 2 * w.nbytes / secs[case] / 1e9
        out.append(Record.compare("kernels", f"cuda_{case}", "GB/s", traffic, "GB/s", "device_peak", peak, params))
    return out


class _HostRuntime(cuda_path.CudaRuntime):
    """The device path's calls on the host: guards, stream and ids cache run as on a GPU; the launch
    stops after its arguments are built (no kernel runs on CPU)."""

    def device_guard(self, device: torch.device) -> contextlib.nullcontext:
        return contextlib.nullcontext()

    def current_stream(self, device: torch.device) -> None:
        return None

    def stream_guard(self, stream: object) -> contextlib.nullcontext:
        return contextlib.nullcontext()

    def upload(self, ids: np.ndarray, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(ids)

    def event(self) -> "_NoEvent":
        return _NoEvent()

    def is_host(self, t: torch.Tensor) -> bool:
        return False  # the buffer stands for one on the device

    def launch(self, view: LayerView, plan: CopyPlan, chunk: torch.Tensor, ids: torch.Tensor, pack: bool) -> None:
        from kvrelay.kernels import triton_kernels
        triton_kernels.prepare(view, plan, chunk, ids, pack)


class _NoEvent:
    def record(self, stream: object) -> None:
        pass


def host_prep(tokens: int = 16, calls: int = 2000) -> dict[str, float]:
    """Microseconds per call of the device path's host work up to the launch (plan, layer view, ids,
    launch arguments), now and with the layer validated and the ids converted on every call."""
    from kvrelay.kernels import triton_kernels  # imported here: triton's import is slow
    w = make_workload(256, layers=1)
    lay, layer, ids = w.layout, w.layers[0], w.ids.tolist()  # engines hand over lists
    out = w.chunks[0]
    rt = _HostRuntime()

    def now() -> None:
        plan = plan_pack(lay, ids, 32, 32 + tokens, None, None)
        cuda_path.copy(cuda_path.layer_view(lay, layer), plan, out, True, None, None, rt)

    def validate_each_call() -> None:
        lay.validate_layer(layer, device=layer.device)
        plan = plan_pack(lay, ids, 32, 32 + tokens, None, None)
        view = lay.layer_view(layer)
        triton_kernels.prepare(view, plan, out, torch.from_numpy(plan.ids).to(layer.device), True)

    result = {}
    for name, fn in (("now", now), ("validate_each_call", validate_each_call)) * 2:  # second round counts
        fn()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        result[name] = (time.perf_counter() - t0) / calls * 1e6
    return result


def run(ctx: BenchContext) -> list[Record]:
    cpu_cases = [(2048, 1), (8192, 1), (2048, 32)] if ctx.quick else \
        [(2048, 1), (8192, 1), (32768, 1), (2048, 32), (8192, 32)]
    repeat = 7 if ctx.quick else 21
    for tokens, layers in ctx.steps(cpu_cases, "cpu pack/unpack", total=len(cpu_cases)):
        w = make_workload(tokens, layers)
        for r in cpu_records(w, measure(w, repeat), layers):
            ctx.add(r)
        del w
        gc.collect()
    us = host_prep()
    ctx.add(Record.compare("kernels", "triton_host_prep", "latency", us["now"], "us/call", "validate_each_call",
                           us["validate_each_call"], dict(tokens=16, device="cpu (host work only)"),
                           lower_is_better=True))
    if torch.cuda.is_available():
        cuda_cases = [(8192, 1), (8192, 32)] if ctx.quick else [(2048, 1), (32768, 1), (8192, 32), (32768, 32)]
        for tokens, layers in ctx.steps(cuda_cases, "cuda pack/unpack", total=len(cuda_cases)):
            w = make_workload(tokens, layers, device="cuda")
            for r in cuda_records(w, measure(w, repeat * 2, sync=torch.cuda.synchronize), layers):
                ctx.add(r)
            del w
            torch.cuda.empty_cache()
    return ctx.records
