"""The `kvrelay up --demo` run: requests through the router, checked against a colocated engine.

Owns: the demo's prompts, the HTTP calls and the printed summary.  Must not touch: the cluster (the
launcher starts and stops it).  The demo passes only if every P/D answer is token-identical to the
colocated engine's and no decode had to recompute its prefill (the KV really moved).

Prompts are token ids drawn inside the model's own vocabulary and kept within its context (both read
from the checkpoint's config.json), so they fit any model, with or without a tokenizer.  Whether the
KV moved is read from the reference engine's answer (``kvrelay.recomputed``) or, for vLLM, from the
decode servers' ``vllm:prompt_tokens_by_source_total{source="external_kv_transfer"}`` counter.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvrelay.httpjson import http_json
from kvrelay.promtext import scrape, sum_samples
from kvrelay.security.http import auth_headers

DEMO_LENGTHS = (1, 17, 130, 333, 700, 1100, 64, 257, 900, 45)
FIRST_ID = 3  # ids 0-2 are the usual pad/bos/eos



def post(url: str, body: dict, timeout: float = 300.0) -> dict:
    return dict(http_json(url, body, timeout, headers=auth_headers()))


@dataclass(frozen=True)
class ModelLimits:
    vocab_size: int
    max_position: int


def model_limits(checkpoint: str | Path | None) -> ModelLimits:
    """Vocabulary and context length of the model the cluster serves (the reference default without a
    checkpoint)."""
    if checkpoint is None:
        from kvrelay.engines.reference.config import ModelConfig
        cfg = ModelConfig()
        return ModelLimits(cfg.vocab_size, cfg.max_position)
    path = Path(checkpoint) / "config.json"
    try:
        data = json.loads(path.read_text())
        return ModelLimits(int(data["vocab_size"]), int(data.get("max_position_embeddings", 4096)))
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot read vocab_size from {path}: {exc}; pass a checkpoint directory holding an HF "
                         f"config.json") from None


def demo_prompts(n: int, limits: ModelLimits, max_tokens: int, seed: int = 0) -> list[list[int]]:
    """``n`` token-id prompts of the DEMO_LENGTHS, inside the vocabulary and the context window."""
    if limits.vocab_size <= FIRST_ID:
        raise ValueError(f"the model's vocab_size {limits.vocab_size} is too small for the demo (needs > {FIRST_ID})")
    rng = random.Random(seed)
    longest = max(1, limits.max_position - max_tokens)
    return [[rng.randrange(FIRST_ID, limits.vocab_size) for _ in range(min(DEMO_LENGTHS[i % len(DEMO_LENGTHS)], longest))]
            for i in range(n)]


def recomputed_by_reference(answer: dict) -> bool | None:
    """The reference engine says in its answer whether the decode recomputed the prefill."""
    return bool(answer.get("kvrelay", {}).get("recomputed"))


class ExternalTokensCounter:
    """vLLM decode servers: a request's KV moved iff their external-KV prompt-token counter grew."""

    METRIC = "vllm:prompt_tokens_by_source_total"

    def __init__(self, decode_urls: list[str]) -> None:
        self.urls = decode_urls
        self.last = self._read()

    def _read(self) -> float:
        return sum(sum_samples(scrape(f"{url}/metrics", timeout=10.0), self.METRIC, source="external_kv_transfer")
                   for url in self.urls)

    def __call__(self, answer: dict) -> bool | None:
        now = self._read()
        moved, self.last = now - self.last, now
        return moved <= 0


def run_demo(router_url: str, colocated_url: str, n: int, max_tokens: int = 16, seed: int = 0,
             limits: ModelLimits | None = None, recomputed: Callable[[dict], bool | None] = recomputed_by_reference,
             expect_kv: bool = True, min_kv_tokens: int = 1) -> int:
    """Send ``n`` prompts through the router and to the colocated engine; 0 if all match (and, with
    ``expect_kv``, the KV moved for each prompt of at least ``min_kv_tokens`` tokens), else 1.
    ``recomputed(answer)`` tells whether the decode recomputed the prompt (None: unknown).  vLLM moves
    whole blocks and always recomputes a prompt's last token, so a prompt of one block or less has no
    KV to move there: its row says ``local``."""
    prompts = demo_prompts(n, limits or model_limits(None), max_tokens, seed)
    print(f"\n{'#':>3} {'prompt':>7} {'P/D s':>7} {'colo s':>7}  match  kv")
    failures = 0
    for i, prompt in enumerate(prompts):
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                "return_token_ids": True}
        t0 = time.perf_counter()
        pd = post(f"{router_url}/v1/completions", body)
        t1 = time.perf_counter()
        ref = post(f"{colocated_url}/v1/completions", body)
        t2 = time.perf_counter()
        same = pd["choices"][0]["token_ids"] == ref["choices"][0]["token_ids"]
        again = recomputed(pd)
        kv = "unknown" if again is None else "recomputed" if again else "pulled"
        if again and len(prompt) < min_kv_tokens:
            kv, again = "local", False
        failures += (not same) + bool(expect_kv and again)
        print(f"{i:>3} {len(prompt):>7} {t1 - t0:>7.2f} {t2 - t1:>7.2f}  {'yes' if same else 'NO':<5}  {kv}")
    verdict = "all P/D outputs match the colocated engine" if not failures else f"{failures} problem(s)"
    if not expect_kv:
        verdict += " (no KV connector: the decode recomputes, only the outputs are checked)"
    print(f"\nkvrelay demo: {n} requests, {verdict}")
    return 0 if not failures else 1
