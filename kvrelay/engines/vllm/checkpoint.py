"""A seeded random Llama checkpoint that vLLM loads as a real model (and the reference engine too).

Owns: choosing the shape of the small test model vLLM runs here.  The writing itself is the reference
engine's `write_random_checkpoint` (one writer, one naming): config.json + model.safetensors in HF
Llama naming, normal weights of std ``std`` (norms 1, lm_head untied), no tokenizer.  With std 0.2 on
this 256-wide, 4-layer model one changed early prompt token changes vLLM's greedy output; with 0.05 the
logits barely move (see DESIGN.md), so equality tests on it mean something.  Must not touch: vLLM.
"""

from __future__ import annotations

from pathlib import Path

from kvrelay.engines.reference.config import ModelConfig
from kvrelay.engines.reference.weights import write_random_checkpoint


def write_llama_checkpoint(path: str | Path, *, seed: int = 0, std: float = 0.2, hidden: int = 256, layers: int = 4,
                           heads: int = 4, kv_heads: int = 2, head_dim: int = 64, intermediate: int = 512,
                           vocab: int = 1024, max_position: int = 4096, dtype: str = "bfloat16",
                           model_id: str = "kvrelay-llama-4l-256") -> Path:
    """Write the checkpoint into ``path`` (created if needed) and return it."""
    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_layers=layers,
                      num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, max_position=max_position,
                      rms_eps=1e-5, init_std=std, seed=seed, model_id=model_id)
    return write_random_checkpoint(path, cfg, dtype=dtype)
