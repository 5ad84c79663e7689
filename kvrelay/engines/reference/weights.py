"""Model weights: seeded random initialisation, and reading/writing safetensors checkpoints in the
Llama/Qwen2 (HF) naming.

`write_random_checkpoint()` writes a directory (config.json + model.safetensors) that loads back into
exactly the in-memory seeded model, and that other engines (vLLM) can load as a real model.  Weights
are normal with std ``init_std`` (norm weights are 1): large enough that logits are far from uniform,
so a wrong KV cache changes the output (tests/engine/test_model.py checks both).  Must not touch: the
forward pass, the cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kvrelay.engines.reference.config import ModelConfig


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF parameter names and shapes of a Llama/Qwen2 model of this config."""
    h, hd, q, kv, i = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for layer in range(cfg.num_layers):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q * hd, h),
            p + "self_attn.k_proj.weight": (kv * hd, h),
            p + "self_attn.v_proj.weight": (kv * hd, h),
            p + "self_attn.o_proj.weight": (h, q * hd),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
        if cfg.qkv_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q * hd,), p + "self_attn.k_proj.bias": (kv * hd,),
                       p + "self_attn.v_proj.bias": (kv * hd,)}
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def random_weights(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Seeded random float32 weights (deterministic for a given config: same seed, same bytes)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith("norm.weight"):
            out[name] = torch.ones(shape)
        elif name.endswith(".bias"):
            out[name] = torch.randn(shape, generator=gen) * 0.02
        else:
            out[name] = torch.randn(shape, generator=gen) * cfg.init_std
    return out


CHECKPOINT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def write_random_checkpoint(path: str | Path, cfg: ModelConfig | None = None, tokenizer_json: str | None = None,
                            dtype: str = "float32") -> Path:
    """Write config.json + model.safetensors of the seeded random model (and tokenizer.json if given).

    ``dtype`` is the stored dtype (float32, bfloat16 or float16; config.json's ``torch_dtype`` says it).
    The weights are drawn in float32 and rounded, so the reference engine loads a bfloat16 checkpoint
    as exactly the rounded values vLLM computes with."""
    if dtype not in CHECKPOINT_DTYPES:
        raise ValueError(f"checkpoint dtype {dtype!r} is not one of {', '.join(CHECKPOINT_DTYPES)}")
    cfg = cfg or ModelConfig()
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg.to_hf() | {"torch_dtype": dtype}, indent=2))
    weights = {name: t.to(CHECKPOINT_DTYPES[dtype]).contiguous() for name, t in random_weights(cfg).items()}
    save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_json is not None:
        (d / "tokenizer.json").write_text(tokenizer_json)
    return d


def load_checkpoint(path: str | Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Read every ``*.safetensors`` in a checkpoint directory; check names and shapes against ``cfg``."""
    d = Path(path)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {d}; pass a Llama/Qwen2-style checkpoint directory")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    want = param_shapes(cfg)
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    missing = sorted(set(want) - set(tensors))
    if missing:
        raise ValueError(f"checkpoint {d} lacks {len(missing)} tensors, e.g. {missing[:3]}; it does not match "
                         f"config.json ({cfg.architecture})")
    out: dict[str, torch.Tensor] = {}
    for name, shape in want.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise ValueError(f"checkpoint tensor {name} has shape {tuple(t.shape)}, config.json implies {shape}")
        out[name] = t.float().contiguous()
    return out
