"""The model: paged forward == a dense reference, logits far from uniform, a changed early token
changes the logits (negative control), exactness across block sizes and prefix splits, checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from kvrelay.engines.reference.config import ModelConfig
from kvrelay.engines.reference.loader import load_model
from kvrelay.engines.reference.model import LlamaModel, SeqInput, make_layout
from kvrelay.engines.reference.weights import write_random_checkpoint

from engine_helpers import rand_prompt


def dense_forward(cfg: ModelConfig, w: dict, ids: list[int]) -> torch.Tensor:
    """Textbook Llama in float64, no cache: logits of every position."""
    d = {k: v.double() for k, v in w.items()}
    n = len(ids)
    x = d["model.embed_tokens.weight"][torch.tensor(ids)]
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(t):
        h = t.shape[-1] // 2
        rot = torch.cat((-t[..., h:], t[..., :h]), -1)
        return t * cos[:, None] + rot * sin[:, None]

    def norm(t, wt):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + cfg.rms_eps) * wt

    g = cfg.num_heads // cfg.num_kv_heads
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        h = norm(x, d[p + "input_layernorm.weight"])
        q = rope((h @ d[p + "self_attn.q_proj.weight"].T).view(n, cfg.num_heads, cfg.head_dim))
        k = rope((h @ d[p + "self_attn.k_proj.weight"].T).view(n, cfg.num_kv_heads, cfg.head_dim))
        v = (h @ d[p + "self_attn.v_proj.weight"].T).view(n, cfg.num_kv_heads, cfg.head_dim)
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        a = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
        x = x + a.transpose(0, 1).reshape(n, -1) @ d[p + "self_attn.o_proj.weight"].T
        h = norm(x, d[p + "post_attention_layernorm.weight"])
        x = x + (F.silu(h @ d[p + "mlp.gate_proj.weight"].T) * (h @ d[p + "mlp.up_proj.weight"].T)) @ \
            d[p + "mlp.down_proj.weight"].T
    return norm(x, d["model.norm.weight"]) @ d["lm_head.weight"].T


def paged_logits(model: LlamaModel, ids: list[int], block_size: int, split: int | None = None,
                 num_blocks: int = 256, scramble: bool = True) -> tuple[torch.Tensor, list, list[int]]:
    cfg = model.cfg
    num_blocks = max(num_blocks, 2 * -(-len(ids) // block_size) + 2)
    layout = make_layout(cfg, num_blocks, block_size, torch.float32)
    cache = layout.allocate()
    need = -(-len(ids) // block_size)
    table = list(range(num_blocks - 1, num_blocks - 1 - 2 * need, -2))[:need] if scramble else list(range(need))
    if split is None:
        out = model.forward([SeqInput(ids, 0, table)], cache, layout, all_logits=True)
    else:
        a = model.forward([SeqInput(ids[:split], 0, table)], cache, layout, all_logits=True)
        b = model.forward([SeqInput(ids[split:], split, table)], cache, layout, all_logits=True)
        out = torch.cat([a, b])
    return out, cache, table


@pytest.fixture(scope="module")
def model(model_cfg, weights):
    return LlamaModel(model_cfg, weights)


@pytest.mark.timeout(120)
def test_paged_forward_matches_dense_reference(model, model_cfg, weights):
    ids = rand_prompt(150, seed=3)
    ref = dense_forward(model_cfg, weights, ids).float()
    got, _, _ = paged_logits(model, ids, block_size=16)
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=1e-3)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_default_logits_are_not_uniform(model):
    logits, _, _ = paged_logits(model, rand_prompt(64, seed=4), block_size=16)
    p = torch.softmax(logits.double(), -1)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)
    uniform = math.log(logits.shape[-1])
    assert logits.std(-1).min() > 1.0, "logits barely vary: weights too small"
    assert entropy.max() < uniform - 1.0, (entropy.max().item(), uniform)
    assert p.max(-1).values.min() > 20 / logits.shape[-1]  # top token >= 20x the uniform probability


@pytest.mark.timeout(120)
def test_negative_control_one_early_token_changes_the_logits(model):
    a = rand_prompt(300, seed=5)
    b = list(a)
    b[3] = (b[3] + 1) % 32000
    la, _, _ = paged_logits(model, a, block_size=16)
    lb, _, _ = paged_logits(model, b, block_size=16)
    assert torch.equal(la[:3], lb[:3])  # causal: positions before the change are identical
    diff = (la[-1] - lb[-1]).abs().max().item()
    assert diff > 0.1, f"changing token 3 of 300 moved the last logits by only {diff}"
    assert la[3:].argmax(-1).ne(lb[3:].argmax(-1)).any()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("block_size,split", [(16, None), (1, None), (32, 100), (64, 257), (16, 1)])
def test_results_are_bit_identical_across_block_sizes_and_prefix_splits(model, block_size, split):
    ids = rand_prompt(300, seed=6)
    ref, ref_cache, ref_table = paged_logits(model, ids, block_size=16, scramble=False)
    got, cache, table = paged_logits(model, ids, block_size=block_size, split=split, num_blocks=512)
    assert torch.equal(got, ref)
    for layer in (0, 7):
        want = ref_cache[layer][:, ref_table].reshape(2, -1, 2, 64)[:, :300]
        have = cache[layer][:, table].reshape(2, -1, 2, 64)[:, :300]
        assert torch.equal(want, have)


@pytest.mark.timeout(120)
def test_checkpoint_round_trip_gives_identical_logits(tmp_path, model):
    cfg = ModelConfig(num_layers=2, hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2,
                      head_dim=32, vocab_size=1000, seed=9, init_std=0.2)
    d = write_random_checkpoint(tmp_path / "ckpt", cfg)
    hf = json.loads((d / "config.json").read_text())
    assert hf["num_hidden_layers"] == 2 and hf["num_key_value_heads"] == 2
    mem_cfg, mem_w, _ = load_model(None, cfg)
    disk_cfg, disk_w, tok = load_model(d)
    assert disk_cfg.model_id == cfg.model_id and tok.vocab_size == 1000
    ids = rand_prompt(40, seed=1, vocab=1000)
    a, _, _ = paged_logits(LlamaModel(mem_cfg, mem_w), ids, block_size=8)
    b, _, _ = paged_logits(LlamaModel(disk_cfg, disk_w), ids, block_size=8)
    assert torch.equal(a, b)


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        load_model(tmp_path / "missing")
    (tmp_path / "c").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path / "c")
    cfg = ModelConfig(num_layers=1, hidden_size=64, intermediate_size=128, num_heads=2, num_kv_heads=1,
                      head_dim=32, vocab_size=300)
    d = write_random_checkpoint(tmp_path / "d", cfg)
    cfg.num_layers = 2
    cfg.save(d / "config.json")
    with pytest.raises(ValueError, match="lacks"):
        load_model(d)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig(num_heads=8, num_kv_heads=3)
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig(hidden_size=0)


def test_checkpoint_with_tokenizer_json_uses_it(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "kv": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    cfg = ModelConfig(num_layers=1, hidden_size=64, intermediate_size=128, num_heads=2, num_kv_heads=1,
                      head_dim=32, vocab_size=300)
    d = write_random_checkpoint(tmp_path / "ck", cfg, tokenizer_json=tok.to_str())
    _, _, loaded = load_model(d)
    assert loaded.encode("hello kv world") == [1, 3, 2]
    _, _, byte_tok = load_model(None, cfg)
    assert byte_tok.encode("hi") == [104, 105] and byte_tok.decode([104, 105, 299]) == "hi<299>"
