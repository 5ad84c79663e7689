"""A plain vLLM server (no connector) serving the seeded checkpoint: greedy output is deterministic for
a token-id prompt, and it depends on the prompt (one changed early token changes it), so token-exact
comparisons against vLLM mean something.  Also the units of kvrelay.engines.vllm.process."""

from __future__ import annotations

import json

import pytest

from vllm_helpers import prompt

pytestmark = pytest.mark.slow  # starts several processes: not in the fast tier (-m 'not slow')


@pytest.mark.timeout(600)
def test_one_token_prompt(plain_server):
    """A fresh server whose first forward is a 1-token prompt dies of SIGILL here; VllmServer's warm-up
    prevents that (kvrelay/engines/vllm/process.py).  First in the module: right after the warm-up."""
    out = plain_server.complete([5], 4, ignore_eos=True)
    assert len(out["choices"][0]["token_ids"]) == 4


@pytest.mark.timeout(600)
def test_greedy_is_deterministic_and_depends_on_the_prompt(plain_server):
    p = prompt(64)
    first = plain_server.complete(p, 16, ignore_eos=True)
    ids = first["choices"][0]["token_ids"]
    assert len(ids) == 16 and all(0 <= t < 1024 for t in ids)
    assert first.get("kv_transfer_params") is None  # no connector configured
    assert plain_server.complete(p, 16, ignore_eos=True)["choices"][0]["token_ids"] == ids
    changed = list(p)
    changed[2] = (changed[2] + 500) % 1024  # negative control: an early token, far from the end
    other = plain_server.complete(changed, 16, ignore_eos=True)["choices"][0]["token_ids"]
    assert other != ids
    assert sum(a != b for a, b in zip(other, ids, strict=True)) >= 8, (ids, other)


@pytest.mark.timeout(600)
def test_metrics_count_prompt_tokens_by_source(plain_server):
    before = plain_server.metrics()
    plain_server.complete(prompt(40, seed=1), 2)
    after = plain_server.metrics()
    from kvrelay.promtext import sum_samples
    name = "vllm:prompt_tokens_by_source_total"
    computed = sum_samples(after, name, source="local_compute") - sum_samples(before, name, source="local_compute")
    assert computed == 40
    assert sum_samples(after, name, source="external_kv_transfer") == 0


def test_server_command_line(llama_ckpt, tmp_path):
    from kvrelay.engines.vllm.process import VllmServer
    kv = {"kv_connector": "KVRelayConnector", "kv_role": "kv_both"}
    s = VllmServer(llama_ckpt, name="m", cpu_core=1, kv_transfer_config=kv, log_path=tmp_path / "x.log",
                   extra_args=["--no-enable-prefix-caching"])
    assert s.url == f"http://127.0.0.1:{s.port}" and s.port > 0
    assert s.argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert "--skip-tokenizer-init" in s.argv  # the checkpoint has no tokenizer
    assert json.loads(s.argv[s.argv.index("--kv-transfer-config") + 1]) == kv
    assert s.argv[-1] == "--no-enable-prefix-caching"
    assert s.argv[s.argv.index("--host") + 1] == "127.0.0.1"
    assert s.env["VLLM_CPU_OMP_THREADS_BIND"] == "1" and s.env["VLLM_HOST_IP"] == "127.0.0.1"
    with_tok = tmp_path / "with-tokenizer"
    with_tok.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (with_tok / f).write_text("{}")
    assert "--skip-tokenizer-init" not in VllmServer(with_tok, log_path=tmp_path / "y.log").argv
    with pytest.raises(ValueError, match="multiple of 32"):
        VllmServer(llama_ckpt, block_size=16)
    with pytest.raises(ValueError, match="config.json"):
        VllmServer(tmp_path / "nowhere")


def test_parse_metrics():
    from kvrelay.promtext import parse_metrics, sum_samples
    text = ('# HELP vllm:x_total x\n# TYPE vllm:x_total counter\n'
            'vllm:x_total{engine="0",source="a"} 3.0\nvllm:x_total{engine="1",source="a"} 4.0\n'
            'vllm:x_total{engine="0",source="b"} 5.0\n# TYPE up gauge\nup 1.0\n')
    m = parse_metrics(text)
    assert m['vllm:x_total{engine="0",source="a"}'] == 3.0 and m["up"] == 1.0
    assert sum_samples(m, "vllm:x_total", source="a") == 7.0
    assert sum_samples(m, "vllm:x_total") == 12.0
    assert sum_samples(m, "vllm:x_total", source="c") == 0.0


def test_reference_engine_loads_the_checkpoint(llama_ckpt):
    """The same checkpoint loads in the reference engine: bfloat16 on disk, 1,024-token vocabulary, no
    tokenizer (the byte-level fallback)."""
    from kvrelay.engines.reference.loader import load_model
    cfg, weights, tok = load_model(llama_ckpt)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim) == (1024, 256, 4, 2, 64)
    assert weights["lm_head.weight"].shape == (1024, 256)
    assert tok.vocab_size == 1024
