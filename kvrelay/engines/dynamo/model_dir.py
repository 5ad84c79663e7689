"""The model directory Dynamo's frontend reads: a checkpoint plus what its preprocessor needs.

Dynamo's frontend tokenizes and applies the chat template itself, from the worker's model directory:
``tokenizer.json``, a chat template in ``tokenizer_config.json`` and an ``eos_token_id`` (in
``generation_config.json`` or ``config.json``).  The reference engine's seeded checkpoints carry no
tokenizer; `add_byte_tokenizer` writes one that is token for token the engine's byte-level tokenizer
(ids 0..255 are UTF-8 bytes) with the engine's own chat template, so Dynamo and a bare `kvrelay engine`
turn the same messages into the same token ids.  `kvrelay dynamo-checkpoint DIR` writes a seeded random
checkpoint with both.  Owns: those files.  Must not touch: the weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# kvrelay.tokenizer.apply_chat_template, as Jinja; every character comes from an
# expression, because Jinja drops a template's trailing newline and trim_blocks the one after a tag
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '\\n' }}{% endfor %}"
                 "{{ '<|assistant|>\\n' }}")
EOS_TOKEN_ID = 0  # the NUL byte


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what the ByteLevel pre-tokenizer uses)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def byte_tokenizer_json() -> str:
    """A `tokenizers` BPE with no merges over the 256 bytes: token id == byte value."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def add_byte_tokenizer(path: str | Path) -> Path:
    """Write tokenizer.json, tokenizer_config.json (chat template) and generation_config.json (EOS) into a
    checkpoint directory whose model has a vocabulary of at least 256."""
    d = Path(path)
    vocab = json.loads((d / "config.json").read_text()).get("vocab_size", 0)
    if vocab < 256:
        raise ValueError(f"{d}/config.json has vocab_size {vocab}; a byte-level tokenizer needs at least 256")
    (d / "tokenizer.json").write_text(byte_tokenizer_json())
    (d / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHAT_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": EOS_TOKEN_ID}))
    return d


def check_model_dir(path: str | Path) -> Path:
    """ValueError naming what Dynamo's frontend would miss in ``path`` (a checkpoint directory)."""
    d = Path(path)
    if not (d / "config.json").is_file():
        raise ValueError(f"--checkpoint {d} has no config.json; pass a Llama/Qwen2 checkpoint directory "
                         "(`kvrelay dynamo-checkpoint DIR` writes a seeded random one)")
    if not (d / "tokenizer.json").is_file():
        raise ValueError(f"--checkpoint {d} has no tokenizer.json, which Dynamo's frontend needs to tokenize; "
                         "add one (a seeded checkpoint: `kvrelay dynamo-checkpoint DIR`)")
    eos = [json.loads(f.read_text()).get("eos_token_id") for f in (d / "generation_config.json", d / "config.json")
           if f.is_file()]
    if not any(e is not None for e in eos):
        raise ValueError(f"--checkpoint {d}: neither generation_config.json nor config.json has an eos_token_id, "
                         "without which Dynamo's frontend refuses the model")
    return d


def stop_token_ids(path: str | Path) -> tuple[int, ...]:
    """The checkpoint's EOS id(s), as the reference engine's ``stop_token_ids``."""
    for f in (Path(path) / "generation_config.json", Path(path) / "config.json"):
        if f.is_file():
            eos = json.loads(f.read_text()).get("eos_token_id")
            if eos is not None:
                return tuple(eos) if isinstance(eos, list) else (int(eos),)
    return ()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvrelay dynamo-checkpoint",
                                description="write a seeded random Llama checkpoint with a byte-level tokenizer, "
                                            "ready for `kvrelay dynamo-worker` and Dynamo's frontend")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--model-id", default="kvrelay-dynamo-4l-256")
    args = p.parse_args(argv)
    from kvrelay.engines.reference.config import ModelConfig
    from kvrelay.engines.reference.weights import write_random_checkpoint
    try:
        # std 0.2 on a 256-wide model: one changed prompt token changes the greedy output (DESIGN.md)
        cfg = ModelConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=args.layers,
                          num_heads=4, num_kv_heads=2, head_dim=64, init_std=0.2, seed=args.seed,
                          model_id=args.model_id)
        add_byte_tokenizer(write_random_checkpoint(args.dir, cfg))
    except (ValueError, OSError) as exc:
        print(f"kvrelay dynamo-checkpoint: {exc}", file=sys.stderr)
        return 2
    print(args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
