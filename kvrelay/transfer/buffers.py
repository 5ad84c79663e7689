"""Turning user buffers into byte views, and the local region record.

Owns: `byte_view()` (torch tensor / numpy array / mmap / bytearray -> writable 1-D uint8 memoryview),
`buffer_address()` and `LocalRegion`.  Must not touch: transports' wire formats.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def byte_view(buf) -> memoryview:
    """A writable, contiguous, 1-D ``B`` memoryview over a CPU buffer; ValueError otherwise."""
    try:
        import torch
        if isinstance(buf, torch.Tensor):
            if buf.device.type != "cpu":
                raise ValueError(f"this transport registers CPU memory only; got a tensor on {buf.device} "
                                 f"(use the nixl or nvlink transport for device memory)")
            if not buf.is_contiguous():
                raise ValueError("cannot register a non-contiguous tensor: call .contiguous() first")
            buf = buf.view(torch.uint8).reshape(-1).numpy() if buf.numel() else np.empty(0, np.uint8)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    try:
        mv = memoryview(buf)
    except TypeError:
        raise ValueError(f"cannot register a {type(buf).__name__}: pass a CPU tensor, numpy array, mmap "
                         f"or bytearray") from None
    if mv.readonly:
        raise ValueError(f"cannot register a read-only {type(buf).__name__}: transfers write into regions")
    if not mv.c_contiguous:
        raise ValueError("cannot register a non-contiguous buffer")
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    return mv


def buffer_address(mv: memoryview) -> int:
    """The address of a writable memoryview's first byte."""
    if mv.nbytes == 0:
        return 0
    return ctypes.addressof(ctypes.c_char.from_buffer(mv))


@dataclass
class LocalRegion:
    region_id: int
    view: memoryview          # CPU bytes (empty for device regions)
    nbytes: int
    device: str = "cpu"
    meta: bytes = b""
    keep: list = field(default_factory=list)  # objects that must outlive the registration
    address: int = 0
    device_obj: torch.Tensor | None = None  # a device tensor for GPU regions
