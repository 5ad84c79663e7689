"""KV layouts and the pack/unpack kernels (see layout.py for the canonical chunk order).

Reading path: layout.py (geometry) -> plan.py (argument checks) -> api.py (pack/unpack dispatch) ->
native.py + csrc/kvcopy.c (CPU), triton_kernels.py (CUDA; CPU via Triton's interpreter), reference.py
(plain torch, for tests).  gpu_check.py runs the Triton kernels on a GPU, against device.py's peak bandwidth.
"""

from kvrelay.kernels.api import IMPLS, pack, unpack
from kvrelay.kernels.layout import KVLayout, LayerTensors, LayerView, Order
from kvrelay.kernels.native import get_num_threads, set_num_threads

__all__ = ["IMPLS", "KVLayout", "LayerTensors", "LayerView", "Order", "pack", "unpack", "get_num_threads",
           "set_num_threads"]
