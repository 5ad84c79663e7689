"""The Llama-style decoder (RMSNorm, RoPE, GQA, SwiGLU) running over a paged KV cache.

Owns: the forward pass of one engine step (a batch of sequences, each computing a run of new tokens
after its cached ones), writing K/V into the paged cache and calling the per-layer hook right after
each layer's KV is written (the prefill role publishes from there).  The cache is a
`kvrelay.kernels.layout.KVLayout` in NHD fused order: one tensor per layer of shape
``[2, num_blocks, block_size, kv_heads, head_dim]``.  Must not touch: block allocation, scheduling,
transports.  Numerics are batch-invariant (see ops.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from kvrelay.engines.reference import ops
from kvrelay.engines.reference.config import ModelConfig
from kvrelay.kernels.layout import KVLayout, LayerTensors, Order

LayerHook = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class LayerWeights:
    ln1: torch.Tensor
    ln2: torch.Tensor
    qkv: torch.Tensor  # q, k and v projections stacked
    qkv_bias: torch.Tensor | None  # Qwen2 has one, Llama none
    o: torch.Tensor
    gate_up: torch.Tensor  # gate and up projections stacked
    down: torch.Tensor


@dataclass(slots=True)
class SeqInput:
    """One sequence's share of a step: compute ``token_ids`` at positions ``start .. start+len-1``."""

    token_ids: list[int]
    start: int
    block_table: list[int]


def make_layout(cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype) -> KVLayout:
    return KVLayout(num_layers=cfg.num_layers, num_blocks=num_blocks, block_size=block_size,
                    num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, dtype=dtype, order=Order.NHD,
                    kv_fused=True)


class LlamaModel:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
        self.cfg = cfg
        w = weights
        self.embed = w["model.embed_tokens.weight"]
        self.norm = w["model.norm.weight"]
        self.lm_head = self.embed if cfg.tie_embeddings else w["lm_head.weight"]
        self.layers: list[LayerWeights] = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            bias = None
            if cfg.qkv_bias:
                bias = torch.cat([w[p + f"self_attn.{n}_proj.bias"] for n in "qkv"])
            self.layers.append(LayerWeights(
                ln1=w[p + "input_layernorm.weight"],
                ln2=w[p + "post_attention_layernorm.weight"],
                qkv=torch.cat([w[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]).contiguous(),
                qkv_bias=bias,
                o=w[p + "self_attn.o_proj.weight"],
                gate_up=torch.cat([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]]).contiguous(),
                down=w[p + "mlp.down_proj.weight"],
            ))
        self.cos, self.sin = ops.rope_tables(cfg.head_dim, cfg.max_position, cfg.rope_theta)
        self.scale = cfg.head_dim ** -0.5

    @torch.inference_mode()
    def forward(self, seqs: Sequence[SeqInput], cache: Sequence[LayerTensors], layout: KVLayout,
                layer_hook: LayerHook | None = None, all_logits: bool = False) -> torch.Tensor:
        """Run one step; return logits [num_seqs, vocab] of each sequence's last new token
        (``all_logits``: [total_new_tokens, vocab]).  Writes the new tokens' KV into ``cache``."""
        cfg = self.cfg
        bs = layout.block_size
        ids, positions, slots, lens = [], [], [], []
        for s in seqs:
            n = len(s.token_ids)
            if n == 0:
                raise ValueError("SeqInput.token_ids is empty: every sequence in a step computes >= 1 token")
            end = s.start + n
            if end > cfg.max_position:
                raise ValueError(f"position {end - 1} exceeds the model's max_position {cfg.max_position}")
            if -(-end // bs) > len(s.block_table):
                raise ValueError(f"block table of {len(s.block_table)} blocks cannot hold {end} tokens")
            ids.extend(s.token_ids)
            positions.append(torch.arange(s.start, end))
            lens.append(n)
        pos = torch.cat(positions)
        tables = [torch.tensor(s.block_table, dtype=torch.long) for s in seqs]
        for t in tables:
            if len(t) and (int(t.min()) < 0 or int(t.max()) >= layout.num_blocks):
                raise ValueError(f"block ids must lie in [0, {layout.num_blocks}), got [{int(t.min())}, "
                                 f"{int(t.max())}]")
        for table, p in zip(tables, positions, strict=True):
            slots.append(table[p // bs] * bs + p % bs)
        slot = torch.cat(slots)
        cos, sin = self.cos[pos], self.sin[pos]
        x = self.embed[torch.tensor(ids, dtype=torch.long)]
        qd, kvd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        for li, lw in enumerate(self.layers):
            h = ops.rms_norm(x, lw.ln1, cfg.rms_eps)
            qkv = ops.linear(h, lw.qkv, lw.qkv_bias)
            q = qkv[:, :qd].view(-1, cfg.num_heads, cfg.head_dim)
            k = qkv[:, qd:qd + kvd].view(-1, cfg.num_kv_heads, cfg.head_dim)
            v = qkv[:, qd + kvd:].view(-1, cfg.num_kv_heads, cfg.head_dim)
            q = ops.apply_rope(q, cos, sin)
            k = ops.apply_rope(k, cos, sin)
            layer = cache[li]
            if not isinstance(layer, torch.Tensor):
                raise ValueError("the reference model's cache is fused: one tensor per layer, not a (K, V) pair")
            flat = layer.view(2, layout.num_blocks * bs, cfg.num_kv_heads, cfg.head_dim)
            flat[0].index_copy_(0, slot, k.to(flat.dtype))
            flat[1].index_copy_(0, slot, v.to(flat.dtype))
            if layer_hook is not None:
                layer_hook(li)
            attn = torch.empty((x.shape[0], cfg.num_heads, cfg.head_dim))
            off = 0
            for s, table, n in zip(seqs, tables, lens, strict=True):
                total = s.start + n
                all_pos = torch.arange(total)
                kv = flat.index_select(1, table[all_pos // bs] * bs + all_pos % bs)  # [2, total, H, D]
                attn[off:off + n] = ops.attention(q[off:off + n], kv[0], kv[1], s.start, self.scale)
                off += n
            x = x + ops.linear(attn.view(-1, qd), lw.o)
            h = ops.rms_norm(x, lw.ln2, cfg.rms_eps)
            gu = ops.linear(h, lw.gate_up)
            inter = gu.shape[1] // 2
            x = x + ops.linear(F.silu(gu[:, :inter]) * gu[:, inter:], lw.down)
        if not all_logits:
            ends = torch.tensor(lens).cumsum(0) - 1
            x = x[ends]
        return ops.linear(ops.rms_norm(x, self.norm, cfg.rms_eps), self.lm_head)
