"""Configuration of the reference engine: the model shape and the engine's runtime knobs.

Owns: `ModelConfig` (Llama/Qwen2-style shape, reads and writes HF ``config.json``) and `EngineConfig`
(cache geometry, batching limits, role).  Both validate themselves on construction and raise
ValueError naming the bad value, the limit and the fix.  Must not touch: weights, tensors, transports.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROLES = ("colocated", "prefill", "decode")
FAILURE_POLICIES = ("recompute", "fail")


@dataclass(slots=True)
class ModelConfig:
    """Shape of a Llama-style decoder (RMSNorm, RoPE, GQA, SwiGLU).  Defaults: the reference model."""

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 64
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    max_position: int = 8192
    qkv_bias: bool = False  # Qwen2 has q/k/v biases
    tie_embeddings: bool = False
    init_std: float = 0.1  # seeded random weights: std of the normal init (see weights.py)
    seed: int = 0
    model_id: str = "kvrelay-ref-8l-512"
    architecture: str = "LlamaForCausalLM"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if not self.init_std > 0:
            raise ValueError(f"ModelConfig.init_std must be > 0, got {self.init_std}")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    # ---- HF config.json --------------------------------------------------------------------------
    def to_hf(self) -> dict[str, Any]:
        return {
            "architectures": [self.architecture],
            "model_type": "qwen2" if self.qkv_bias else "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_eps,
            "max_position_embeddings": self.max_position,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
            "kvrelay": {"init_std": self.init_std, "seed": self.seed, "model_id": self.model_id},
        }

    @classmethod
    def from_hf(cls, data: dict[str, Any], model_id: str | None = None) -> "ModelConfig":
        act = data.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json hidden_act={act!r} is not supported (only 'silu' / SwiGLU)")
        if data.get("rope_scaling"):
            raise ValueError(f"config.json rope_scaling={data['rope_scaling']!r} is not supported; use a model "
                             f"without RoPE scaling")
        extra = data.get("kvrelay", {})
        heads = int(data["num_attention_heads"])
        archs = data.get("architectures") or ["LlamaForCausalLM"]
        qwen = data.get("model_type") == "qwen2" or archs[0].startswith("Qwen2")
        return cls(
            vocab_size=int(data["vocab_size"]), hidden_size=int(data["hidden_size"]),
            intermediate_size=int(data["intermediate_size"]), num_layers=int(data["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(data.get("num_key_value_heads", heads)),
            head_dim=int(data.get("head_dim") or data["hidden_size"] // heads),
            rope_theta=float(data.get("rope_theta", 10000.0)), rms_eps=float(data.get("rms_norm_eps", 1e-6)),
            max_position=int(data.get("max_position_embeddings", 8192)),
            qkv_bias=bool(data.get("attention_bias", qwen)), tie_embeddings=bool(data.get("tie_word_embeddings", False)),
            init_std=float(extra.get("init_std", 0.1)), seed=int(extra.get("seed", 0)),
            model_id=model_id or extra.get("model_id") or "local-checkpoint", architecture=archs[0])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf(), indent=2))

    @classmethod
    def load(cls, path: str | Path, model_id: str | None = None) -> "ModelConfig":
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"no config.json at {p}; pass a checkpoint directory holding config.json")
        try:
            data = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{p}: malformed JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{p}: expected a JSON object (an HF config.json), got {type(data).__name__}")
        try:
            return cls.from_hf(data, model_id=model_id)
        except KeyError as exc:
            raise ValueError(f"{p}: missing key {exc.args[0]!r} (an HF config.json of a Llama/Qwen2 model)") from None
        except (TypeError, ValueError) as exc:
            if str(exc).startswith("config.json") or str(exc).startswith("ModelConfig"):
                raise ValueError(f"{p}: {exc}") from None
            raise ValueError(f"{p}: a value has the wrong type ({exc})") from None


@dataclass(slots=True)
class EngineConfig:
    """Runtime knobs of one engine process."""

    block_size: int = 16
    num_blocks: int = 1024
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 4096
    max_model_len: int = 4096
    role: str = "colocated"
    dtype: torch.dtype = torch.float32
    failure_policy: str = "recompute"  # decode role: what to do when a pull fails
    pull_timeout_s: float = 30.0  # decode role: deadline for the whole pull of one request
    chunk_tokens: int = 256  # tokens per published chunk (the hash-chain block)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("block_size", "num_blocks", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                     "chunk_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"EngineConfig.{name} must be a positive int, got {value!r}")
        if self.role not in ROLES:
            raise ValueError(f"EngineConfig.role must be one of {ROLES}, got {self.role!r}")
        if self.failure_policy not in FAILURE_POLICIES:
            raise ValueError(f"EngineConfig.failure_policy must be one of {FAILURE_POLICIES}, "
                             f"got {self.failure_policy!r}")
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"EngineConfig.dtype must be float32, bfloat16 or float16, got {self.dtype}")
        if self.max_model_len > self.num_blocks * self.block_size:
            raise ValueError(f"EngineConfig.max_model_len ({self.max_model_len}) exceeds the KV cache "
                             f"({self.num_blocks} blocks x {self.block_size} tokens); raise num_blocks or lower "
                             f"max_model_len")
        if not self.pull_timeout_s > 0:
            raise ValueError(f"EngineConfig.pull_timeout_s must be > 0, got {self.pull_timeout_s}")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dtype"] = str(self.dtype)
        return d
