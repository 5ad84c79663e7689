"""The Triton kernel seen by the compiler, without a GPU: specialisation keys and sm_90 builds.

Owns: `specialization_key` (the key Triton's launcher computes to pick a compiled binary, through
Triton's own binder for a CUDA target) and `compile_for` (a full build to PTX and cubin with the
ptxas shipped in Triton's wheel, reporting registers per thread and the load/store widths).  Tests
and the GPU check use them to show that per-request integers do not recompile and what a tile costs.
Must not touch: devices (nothing here needs or uses CUDA).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as triton_compile, make_backend
from triton.runtime.jit import create_function_from_signature

from kvrelay.kernels import triton_kernels

SM90 = GPUTarget("cuda", 90, 32)


class _HostPtr:
    """A stand-in for a device tensor: Triton's binder reads only ``data_ptr()`` and ``dtype``."""

    def __init__(self, t: torch.Tensor, address: int | None = None) -> None:
        self.dtype = t.dtype
        self._ptr = t.data_ptr() if address is None else address

    def data_ptr(self) -> int:
        return self._ptr


def _bind(args: tuple, kwargs: dict[str, Any], target: GPUTarget) -> tuple[Any, Any, list, Any]:
    fn = triton_kernels.kv_copy_jit
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    return backend, bound, specialization, options


def specialization_key(launch: triton_kernels.Launch, pack: bool, target: GPUTarget = SM90,
                       chunk_address: int | None = None) -> tuple:
    """What Triton keys its compiled binaries on for this launch (types and specialised values)."""
    args = list(launch.args)
    if chunk_address is not None:
        args[2] = _HostPtr(args[2], chunk_address)
    _, _, specialization, _ = _bind(tuple(args), triton_kernels.launch_options(launch, pack), target)
    return tuple((kind, value) for kind, value in specialization)


@dataclass(frozen=True)
class Build:
    registers: int  # per thread, from cuobjdump's resource usage of the cubin
    num_warps: int
    loads: tuple[str, ...]  # distinct global load/store instructions in the PTX (v2.b64 = 16-byte vectors)
    ptx_lines: int


def compile_for(launch: triton_kernels.Launch, pack: bool, target: GPUTarget = SM90) -> Build:
    """Build the kernel for ``target`` as the launcher would for this launch (a few seconds on CPU)."""
    fn = triton_kernels.kv_copy_jit
    kwargs = triton_kernels.launch_options(launch, pack)
    backend, bound, specialization, options = _bind(launch.args, kwargs, target)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    kernel = triton_compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    ptx = kernel.asm["ptx"]
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+)", usage)
    if m is None:
        raise RuntimeError(f"no register count in cuobjdump's output: {usage!r:.300}")
    loads = tuple(sorted(set(re.findall(r"\b((?:ld|st)\.global[.\w]*)", ptx))))
    return Build(int(m.group(1)), kernel.metadata.num_warps, loads, ptx.count("\n"))
