"""Helpers for the kernels tests: random caches in every order, a logical model KV, TP rank layouts.

Owns: test fixtures' data only.  Caches are filled with random bytes (every bit pattern, NaNs included)
so comparisons are byte-exact; some are built as views of padded storage (vLLM may pad blocks).
"""

from __future__ import annotations

import torch

from kvrelay.kernels import reference
from kvrelay.kernels.layout import KVLayout, LayerTensors, Order
from kvrelay.kernels.plan import plan_unpack

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn)


def random_bytes_(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Fill ``t`` (any dtype, possibly non-contiguous) with random bytes."""
    b = t.view(torch.uint8)
    b.copy_(torch.randint(0, 256, b.shape, dtype=torch.uint8, generator=gen))
    return t


def allocate(layout: KVLayout, gen: torch.Generator, padded: bool = False) -> LayerTensors:
    """One random layer; with ``padded`` the block dim has a larger stride than dense (padding between blocks)."""
    shape = layout.tensor_shape()
    bdim = 1 if (layout.order in (Order.NHD, Order.HND) and layout.kv_fused) else 0

    def one() -> torch.Tensor:
        if not padded:
            return random_bytes_(torch.empty(shape, dtype=layout.dtype), gen)
        big = list(shape)
        big[bdim + 1] += 1  # one more slot/head row per block: the block stride grows
        t = random_bytes_(torch.empty(big, dtype=layout.dtype), gen)
        return t.narrow(bdim + 1, 0, shape[bdim + 1])

    return one() if layout.fused else (one(), one())


def clone_layer(layer: LayerTensors) -> LayerTensors:
    if isinstance(layer, torch.Tensor):
        return _clone_strided(layer)
    return (_clone_strided(layer[0]), _clone_strided(layer[1]))


def _clone_strided(t: torch.Tensor) -> torch.Tensor:
    """A copy with the same strides (and padding contents) as ``t``."""
    base = t.as_strided((t.untyped_storage().nbytes() // t.element_size(),), (1,), 0).clone()
    return base.as_strided(t.shape, t.stride(), t.storage_offset())


def layers_equal(a: LayerTensors, b: LayerTensors) -> bool:
    """Byte-exact, padding included (so a write outside the logical cache is caught)."""
    ta = (a,) if isinstance(a, torch.Tensor) else a
    tb = (b,) if isinstance(b, torch.Tensor) else b
    return len(ta) == len(tb) and all(_storage_bytes(x).equal(_storage_bytes(y)) for x, y in zip(ta, tb, strict=True))


def _storage_bytes(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())


def rank_layouts(order: Order | str, fused: bool, dtype: torch.dtype, block_size: int, total_heads: int, tp: int,
                 head_dim: int, num_blocks: int) -> list[KVLayout]:
    """One layout per tensor-parallel rank, each holding an equal slice of the model's KV heads."""
    per = total_heads // tp
    return [KVLayout(num_layers=1, num_blocks=num_blocks, block_size=block_size, num_kv_heads=per,
                     head_dim=head_dim, dtype=dtype, order=order, kv_fused=fused, head_start=r * per,
                     total_kv_heads=total_heads) for r in range(tp)]


def write_logical(layout: KVLayout, layer: LayerTensors, ids, logical: torch.Tensor) -> None:
    """Write the model's canonical KV ``logical`` ([kv, tokens, total_heads, row bytes], uint8) into a rank's cache."""
    n = logical.shape[1]
    plan = plan_unpack(layout, ids, 0, n, 0, layout.total_kv_heads)
    reference.unpack(layout, layer, plan, logical.contiguous())
