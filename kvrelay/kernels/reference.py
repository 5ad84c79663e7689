"""Plain torch reference pack/unpack: obviously correct, slow; tests compare the fast paths against it.

Owns: a logical per-plane view ``[num_blocks, block_size, heads, row_bytes]`` (uint8) of each cache
order built from permutes and slices only (independent of `LayerView`'s byte strides), and gather /
scatter through advanced indexing.  Must not touch: anything outside the given tensors.  Callers pass a
plan already checked by plan.py.
"""

from __future__ import annotations

import torch

from kvrelay.kernels.layout import KVLayout, LayerTensors, Order
from kvrelay.kernels.plan import CopyPlan


def planes(layout: KVLayout, layer: LayerTensors) -> list[torch.Tensor]:
    """Per-plane uint8 views ``[num_blocks, block_size, heads, head_dim * itemsize]`` sharing the cache's memory."""
    d = layout.head_dim
    if layout.order is Order.MLA:
        t = layer if isinstance(layer, torch.Tensor) else layer[0]
        logical = [t.unsqueeze(2)]
    elif layout.order is Order.CPU:
        if not isinstance(layer, torch.Tensor):
            raise ValueError("a CPU-order layer is one tensor [num_blocks, heads, block_size, 2*head_dim], got a pair")
        t = layer  # [nb, h, bs, 2d]
        logical = [t[..., :d].permute(0, 2, 1, 3), t[..., d:].permute(0, 2, 1, 3)]
    else:
        kv = [layer[0], layer[1]]  # fused: index the leading 2; split: the (K, V) pair
        logical = kv if layout.order is Order.NHD else [x.permute(0, 2, 1, 3) for x in kv]
    return [x.view(torch.uint8) for x in logical]


def _index(layout: KVLayout, plan: CopyPlan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.arange(plan.token_start, plan.token_end, device=device)
    ids = torch.as_tensor(plan.ids, device=device)
    return ids[tokens // layout.block_size], tokens % layout.block_size


def pack(layout: KVLayout, layer: LayerTensors, plan: CopyPlan, out: torch.Tensor) -> int:
    ps = planes(layout, layer)
    blocks, slots = _index(layout, plan, ps[0].device)
    h0, h1 = plan.cache_h0, plan.cache_h0 + plan.num_heads
    chunk = torch.stack([p[blocks, slots, h0:h1] for p in ps])  # [kv, T, heads, row]
    flat = out.view(-1).view(torch.uint8) if out.dtype != torch.uint8 else out.view(-1)
    flat[: plan.nbytes].copy_(chunk.reshape(-1))
    return plan.nbytes


def unpack(layout: KVLayout, layer: LayerTensors, plan: CopyPlan, chunk: torch.Tensor) -> int:
    ps = planes(layout, layer)
    blocks, slots = _index(layout, plan, ps[0].device)
    flat = chunk.reshape(-1).view(torch.uint8)[: plan.nbytes].to(ps[0].device)
    data = flat.view(len(ps), plan.num_tokens, plan.chunk_heads, -1)
    c0, c1 = plan.chunk_h0, plan.chunk_h0 + plan.num_heads
    h0, h1 = plan.cache_h0, plan.cache_h0 + plan.num_heads
    for kv, p in enumerate(ps):
        p[blocks, slots, h0:h1] = data[kv, :, c0:c1]
    return plan.nbytes
