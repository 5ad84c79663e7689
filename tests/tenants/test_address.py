"""The tenant's cache_salt is part of the content address: the same salt hits, another salt misses -- in the
hash chain, in the store (counted per tenant), and in the reference engine's own prefix cache."""

from __future__ import annotations

import pytest
import xxhash

from tenant_helpers import chunk_keys_for, payload, put
from kvrelay.engines.reference.api import parse
from kvrelay.engines.reference.block_manager import BlockManager
from kvrelay.engines.reference.sequence import SamplingParams, Sequence
from kvrelay.tokenizer import ByteTokenizer
from kvrelay.keys import block_hashes, check_salt

PROMPT = list(range(100, 164))


def test_salt_in_the_hash_chain():
    plain = block_hashes(PROMPT, 16, "m", "c")
    # unsalted addresses are the ones published before salts existed (a store keeps its prefix cache)
    seed = xxhash.xxh3_128_digest(b"kvrelay|m|c")
    h = xxhash.xxh3_128()
    h.update(seed)
    h.update(bytes().join(t.to_bytes(8, "little") for t in PROMPT[:16]))
    assert plain[0] == h.hexdigest()
    assert block_hashes(PROMPT, 16, "m", "c", "alice") == block_hashes(PROMPT, 16, "m", "c", "alice")
    other = block_hashes(PROMPT, 16, "m", "c", "bob")
    assert not set(other) & set(block_hashes(PROMPT, 16, "m", "c", "alice")) and not set(other) & set(plain)
    for bad in (5, "", "x" * 257, "a\nb"):
        with pytest.raises(ValueError, match="cache_salt"):
            check_salt(bad)


def test_same_salt_hits_other_salt_misses_in_the_store(make_core):
    core = make_core()
    mine = chunk_keys_for(PROMPT, "alice")
    for i, k in enumerate(mine):
        put(core, k, payload(i), tenant="alice")
    assert core.lookup(chunk_keys_for(PROMPT, "alice"), tenant="alice") == len(mine)  # same salt: a hit
    # another tenant probing alice's prompt: a miss from the first chunk, exactly as for a prompt never stored
    probe = chunk_keys_for(PROMPT, "mallory")
    cold = chunk_keys_for([t + 1 for t in PROMPT], "mallory")
    assert core.lookup(probe, tenant="mallory") == 0 == core.lookup(cold, tenant="mallory")
    assert core.lookup(chunk_keys_for(PROMPT, ""), tenant="") == 0  # nor does the unsalted space see it
    assert all(core.acquire(k) is None for k in probe)
    t = core.stats()["tenants"]
    assert t["alice"]["lookup_chunks_hit"] == len(mine) and t["alice"]["memory_bytes"] == len(mine) * 65536
    assert t["mallory"]["lookup_chunks"] == 2 * len(probe) and t["mallory"].get("lookup_chunks_hit", 0) == 0
    assert t["mallory"].get("memory_bytes", 0) == 0  # the probe left nothing behind either


def _seq(salt: str) -> Sequence:
    return Sequence(list(PROMPT), SamplingParams(max_tokens=1), cache_salt=salt)


def test_engine_prefix_cache_is_salted():
    bm = BlockManager(64, 16)
    first = _seq("alice")
    bm.allocate(first)
    bm.free_seq(first)
    again, probe, plain = _seq("alice"), _seq("mallory"), _seq("")
    for s in (again, probe, plain):
        bm.allocate(s)
    assert again.num_cached_tokens == 48  # full blocks before the last prompt token
    assert probe.num_cached_tokens == 0 and plain.num_cached_tokens == 0


def test_openai_body_cache_salt():
    tok = ByteTokenizer(1000)
    assert parse({"prompt": [1, 2, 3], "cache_salt": "alice"}, tok, chat=False).cache_salt == "alice"
    assert parse({"prompt": [1, 2, 3]}, tok, chat=False).cache_salt == ""
    with pytest.raises(ValueError, match="cache_salt"):
        parse({"prompt": [1, 2, 3], "cache_salt": 7}, tok, chat=False)
