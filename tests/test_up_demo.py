"""`kvrelay up --demo`, the README's main job: real store, prefill, decode, router and colocated engine
processes on 127.0.0.1; P/D answers must be token-identical to colocated and the KV must really move.
The demo's prompts fit whatever model it is given (its vocabulary and context, from config.json)."""

import json
import subprocess
import sys

import pytest

from kvrelay.demo import ModelLimits, demo_prompts, model_limits


def run_up(*args):
    proc = subprocess.run([sys.executable, "-m", "kvrelay.cli", "up", "--demo", *args],
                          capture_output=True, text=True, timeout=540)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.slow  # a whole `kvrelay up` cluster
@pytest.mark.timeout(600)
@pytest.mark.parametrize("transport", ["shm"])
def test_up_demo(tmp_path, transport):
    code, out = run_up("--requests", "3", "--transport", transport, "--workdir", str(tmp_path))
    assert code == 0, out
    assert "3 requests, all P/D outputs match the colocated engine" in out
    assert out.count("pulled") == 3, out


@pytest.mark.slow  # a whole `kvrelay up` cluster
@pytest.mark.timeout(600)
def test_up_demo_small_vocab_checkpoint(tmp_path):
    """A checkpoint with a 1,024-token vocabulary and no tokenizer (the one vLLM tests use): the demo's
    prompts stay inside its vocabulary (they used to reach 30,000 and fail at once)."""
    from kvrelay.engines.vllm.checkpoint import write_llama_checkpoint
    ckpt = write_llama_checkpoint(tmp_path / "ckpt")
    code, out = run_up("--requests", "3", "--checkpoint", str(ckpt), "--workdir", str(tmp_path / "up"))
    assert code == 0, out
    assert "3 requests, all P/D outputs match the colocated engine" in out
    assert out.count("pulled") == 3, out


def test_demo_prompts_fit_the_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 50, "max_position_embeddings": 200}))
    limits = model_limits(tmp_path)
    assert limits == ModelLimits(50, 200)
    prompts = demo_prompts(10, limits, max_tokens=16)
    assert all(3 <= t < 50 for p in prompts for t in p)
    assert max(len(p) for p in prompts) == 200 - 16 and min(len(p) for p in prompts) == 1
    assert demo_prompts(10, limits, 16) == prompts  # seeded
    assert model_limits(None).vocab_size == 32000
    with pytest.raises(ValueError, match="vocab_size"):
        model_limits(tmp_path / "missing")
