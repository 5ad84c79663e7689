"""Build an `Engine` from a checkpoint directory or a seeded random config.

Owns: the choice between ``--checkpoint DIR`` (config.json + safetensors + optional tokenizer.json) and
seeded random weights, and the model id.  Must not touch: the forward pass.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kvrelay.engines.reference.config import ModelConfig
from kvrelay.engines.reference.weights import load_checkpoint, random_weights
from kvrelay.tokenizer import Tokenizer, load_tokenizer


def load_model(checkpoint: str | Path | None = None, model_cfg: ModelConfig | None = None,
               model_id: str | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    if checkpoint is not None:
        d = Path(checkpoint)
        if not d.is_dir():
            raise ValueError(f"--checkpoint {d} is not a directory; pass a dir holding config.json + *.safetensors")
        cfg = ModelConfig.load(d / "config.json", model_id=model_id)
        weights = load_checkpoint(d, cfg)
    else:
        cfg = model_cfg or ModelConfig()
        if model_id:
            cfg.model_id = model_id
        weights = random_weights(cfg)
    return cfg, weights, load_tokenizer(checkpoint, cfg.vocab_size)
