"""Tokenizers: a checkpoint's ``tokenizer.json`` (the `tokenizers` package) or a byte-level fallback,
and the plain chat template of the reference engine's /v1/chat/completions.

In the base layer: the reference engine tokenizes with it, and the router (kvrelay.router.tokenize) falls
back to it for workers that do not tokenize for it.  Owns: text <-> token ids.  Must not touch: any model
or engine (it imports nothing of kvrelay).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are token ids 0..255; ids above 255 (a random model's vocabulary) decode as ``<id>``."""

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 256:
            raise ValueError(f"the byte-level tokenizer needs vocab_size >= 256, the model has {vocab_size}")
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        out: list[str] = []
        run = bytearray()
        for t in ids:
            if 0 <= t < 256:
                run.append(t)
                continue
            if run:
                out.append(run.decode("utf-8", errors="replace"))
                run = bytearray()
            out.append(f"<{t}>")
        if run:
            out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer:
    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _T
        self._tok = _T.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


def load_tokenizer(checkpoint: str | Path | None, vocab_size: int) -> Tokenizer:
    if checkpoint is not None:
        p = Path(checkpoint) / "tokenizer.json"
        if p.is_file():
            tok = HFTokenizer(p)
            if tok.vocab_size > vocab_size:
                raise ValueError(f"{p} has {tok.vocab_size} tokens but the model's vocab_size is {vocab_size}")
            return tok
    return ByteTokenizer(vocab_size)


def apply_chat_template(messages: list[dict]) -> str:
    """A minimal, fixed template: ``<|role|>\\ncontent\\n`` per message, then ``<|assistant|>\\n``."""
    parts = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        content = m["content"]
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(c.get("text", "") for c in content if isinstance(c, dict))
        parts.append(f"<|{m['role']}|>\n{content}\n")
    return "".join(parts) + "<|assistant|>\n"
