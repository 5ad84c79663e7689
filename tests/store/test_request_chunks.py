"""RequestChunks (kvrelay/store/requestchunks.py): which pulls under a request id can never be served by that
id's publisher, so that they fail at once: another prompt, or the KV heads cut otherwise (tensor parallelism)."""

from __future__ import annotations

from kvrelay.keys import ChunkKey
from kvrelay.store.requestchunks import RequestChunks


def _keys(hashes: str, heads: list[tuple[int, int]]) -> list[ChunkKey]:
    return [ChunkKey(h, layer, a, b) for h in hashes for layer in (0, 1) for a, b in heads]


def test_another_prompt_under_the_id_is_a_mismatch():
    rc = RequestChunks()
    rc.reserved("r", _keys("ab", [(0, 4)]), now=0)
    assert rc.mismatch("r", _keys("a", [(0, 4)]), now=1) is None
    assert "none of the 1 this pull waits for" in (rc.mismatch("r", _keys("x", [(0, 4)]), now=1) or "")
    assert rc.mismatch("unknown", _keys("x", [(0, 4)]), now=1) is None


def test_heads_cut_otherwise_are_a_mismatch_but_another_ranks_slice_is_not():
    rc = RequestChunks()
    rc.reserved("r", _keys("ab", [(0, 2)]), now=0)  # prefill rank 0 of 2 reserved; rank 1's [2, 4) comes later
    assert rc.mismatch("r", _keys("ab", [(2, 4)]), now=1) is None  # a decode rank that pulls rank 1's slice waits
    assert rc.mismatch("r", _keys("ab", [(0, 2)]), now=1) is None
    why = rc.mismatch("r", _keys("ab", [(0, 4)]), now=1)  # a TP 1 decode expecting whole chunks never gets one
    assert why is not None and "[(0, 2)]" in why and "heads [0, 4)" in why and "head_slices" in why
    rc.reserved("r", [ChunkKey("f", -1, 0, 0)], now=2)  # a first-token record cuts no heads
    assert rc.mismatch("r", _keys("ab", [(2, 4)]), now=3) is None


def test_expired_ids_are_forgotten():
    rc = RequestChunks(ttl=10)
    rc.reserved("r", _keys("a", [(0, 2)]), now=0)
    assert rc.mismatch("r", _keys("a", [(0, 4)]), now=5) is not None
    rc.sweep(now=11)
    assert len(rc) == 0 and rc.mismatch("r", _keys("a", [(0, 4)]), now=11) is None
