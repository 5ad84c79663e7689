"""KV layouts and the pack/unpack kernels (see layout.py for the canonical chunk order).

Reading path: layout.py (geometry) -> plan.py (argument checks) -> api.py (pack/unpack dispatch) ->
native.py + csrc/kvcopy.c (CPU), cuda_path.py (CUDA: the stream contract, device guard, staging) ->
triton_kernels.py (the kernel; CPU via Triton's interpreter), reference.py (plain torch, for tests).
compile_check.py builds the kernel for sm_90 without a GPU; gpu_parts.py holds the kernel parts of the
ten-minute GPU check (kvrelay/diagnostics/gpu_check.py), against device.py's peak bandwidth.
"""

from kvrelay.kernels.api import IMPLS, pack, unpack
from kvrelay.kernels.layout import KVLayout, LayerTensors, LayerView, Order
from kvrelay.kernels.native import get_num_threads, set_num_threads

__all__ = ["IMPLS", "KVLayout", "LayerTensors", "LayerView", "Order", "pack", "unpack", "get_num_threads",
           "set_num_threads"]
