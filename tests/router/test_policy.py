"""Cache-aware routing and conditional disaggregation over a synthetic KV index.

The index is fed event batches as the subscribers hand them over (kvrelay.events.wire structs); the
publishers' own block hashes are arbitrary numbers here, as they would be for any engine's scheme.
"""

import pytest

from kvrelay.events.wire import AllBlocksCleared, BlockRemoved, make_batch, stored
from kvrelay.router.kvindex import KVIndex, prompt_hashes
from kvrelay.router.policy import STORE, Disagg, Policy
from kvrelay.router.pool import Pool

BS = 16
P = ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]
D = ["http://127.0.0.1:9101", "http://127.0.0.1:9102"]


def prompt(seed: int, n: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 50000 for i in range(n)]


def publish(index: KVIndex, source: str, tokens: list[int], medium: str = "GPU", base: int = 1000,
            block_size: int = BS, salt: str = "") -> list[int]:
    """Store ``tokens``' blocks on ``source`` as one BlockStored per block (publisher hashes base+i)."""
    ext, parent = [], None
    for i in range(0, len(tokens), block_size):
        h = base + i // block_size
        index.apply(source, make_batch([stored([h], parent, tokens[i:i + block_size], block_size, medium, salt)]))
        ext.append(h)
        parent = h
    return ext


def pools():
    return Pool("prefill", P), Pool("decode", D)


def test_index_matches_the_longest_prefix_by_tier_and_forgets_removed_blocks():
    idx = KVIndex()
    sys = prompt(1, 64)
    ext = publish(idx, P[0], sys)
    user = sys + prompt(2, 40)
    h = prompt_hashes(user, [BS])
    m = idx.match(P[0], h)
    assert m.blocks == {"device": 4} and m.prompt_blocks == 7 and m.tokens() == 64
    assert idx.match(P[1], h).blocks == {}  # another worker holds nothing
    assert idx.match(P[0], prompt_hashes(prompt(3, 64), [BS])).blocks == {}  # negative control: other tokens
    idx.apply(P[0], make_batch([BlockRemoved(block_hashes=[ext[2]], medium="GPU")]))
    assert idx.match(P[0], h).blocks == {"device": 2}  # the prefix ends at the removed block
    idx.apply(P[0], make_batch([AllBlocksCleared()]))
    assert idx.match(P[0], h).blocks == {}
    # the same blocks on two tiers: the best one counts; removing it leaves the other
    publish(idx, STORE, sys, "CPU_TIER1", block_size=32)
    publish(idx, STORE, sys, "DISK", block_size=32)
    assert idx.match(STORE, prompt_hashes(user, [32])).blocks == {"host": 2}
    idx.apply(STORE, make_batch([BlockRemoved(block_hashes=[1000, 1001], medium="CPU_TIER1")]))
    assert idx.match(STORE, prompt_hashes(user, [32])).blocks == {"disk": 2}
    # a child whose parent the index never saw cannot be named: skipped and counted
    idx.apply(P[1], make_batch([stored([77], 76, prompt(4, BS), BS, "GPU")]))
    assert idx.orphans == 1


def test_cache_aware_prefers_the_worker_holding_the_prefix_weighted_by_tier():
    idx = KVIndex()
    sys = prompt(1, 256)
    user = sys + prompt(9, 64)
    publish(idx, P[1], sys)  # device
    pre, dec = pools()
    d = Policy("cache_aware", idx, Disagg(decode_hit=2.0)).decide(pre, dec, user)
    assert d.reason == "pd" and d.prefill is pre.workers[1] and d.prefill_tokens == 64
    # round robin ignores the cache (negative control): it alternates
    rr = Policy("round_robin", idx, Disagg(decode_hit=2.0))
    pre.policy = "round_robin"
    assert {rr.decide(pre, dec, user).prefill.url for _ in range(4)} == set(P)
    # load outweighs a small hit: 256 cached tokens on P1 against 10,000 tokens queued there
    pre.policy = "cache_aware"
    busy = pre.workers[1].hold(tokens=10_000)
    assert Policy("cache_aware", idx, Disagg(decode_hit=2.0)).decide(pre, dec, user).prefill is pre.workers[0]
    # tiers: P0 holds the prefix on disk (0.25), P1 in host memory (0.75): P1 computes less
    idx2 = KVIndex()
    publish(idx2, P[0], sys, "DISK")
    publish(idx2, P[1], sys, "CPU")
    busy.release()
    d = Policy("cache_aware", idx2, Disagg(decode_hit=2.0)).decide(pre, dec, user)
    assert d.prefill is pre.workers[1] and d.prefill_tokens == 320 - 192
    # the decode side: no decode worker holds the prompt itself, so the one with fewer requests in flight
    dec.workers[0].hold(requests=1, tokens=500)
    assert Policy("cache_aware", idx, Disagg(decode_hit=2.0)).decide(pre, dec, user).decode is dec.workers[1]


def test_conditional_disaggregation_decisions():
    idx = KVIndex()
    sys = prompt(1, 256)
    pre, dec = pools()
    pol = Policy("cache_aware", idx, Disagg(min_prefill_tokens=64, decode_hit=0.8))
    d = pol.decide(pre, dec, prompt(5, 40))
    assert (d.reason, d.prefill, d.pull) == ("short_prompt", None, False)
    assert pol.decide(pre, dec, prompt(5, 64)).reason == "pd"  # at the threshold: both legs
    # a decode worker holds 256 of 300 tokens on device (>= 0.8): it computes the rest alone
    publish(idx, D[1], sys)
    d = pol.decide(pre, dec, sys + prompt(6, 44))
    assert (d.reason, d.decode.url, d.prefill, d.pull) == ("decode_holds_prefix", D[1], None, False)
    # ... but not 256 of 400 (0.64), nor when the same blocks are on its disk (0.25 x 256 of 300)
    assert pol.decide(pre, dec, sys + prompt(6, 144)).reason == "pd"
    idx.apply(D[1], make_batch([AllBlocksCleared()]))
    publish(idx, D[1], sys, "DISK")
    assert pol.decide(pre, dec, sys + prompt(6, 44)).reason == "pd"
    # the store holds every chunk of the prompt, its partial last chunk included: no prefill leg
    whole = sys + prompt(7, 100)
    publish(idx, STORE, whole, "CPU_TIER1", base=5000, block_size=128)
    d = pol.decide(pre, dec, whole)
    assert (d.reason, d.prefill, d.pull) == ("store_holds_prompt", None, True)
    assert pol.decide(pre, dec, whole + [1]).reason == "pd"  # one token more is not held whole
    assert pol.decide(pre, dec, whole, store_up=False).reason == "pd"
    off = Policy("cache_aware", idx, Disagg(min_prefill_tokens=64, decode_hit=0.8, store_whole=False))
    assert off.decide(pre, dec, whole).reason == "pd"


def test_bad_thresholds_are_refused():
    with pytest.raises(ValueError, match="--decode-only-below -1"):
        Disagg(min_prefill_tokens=-1)
    with pytest.raises(ValueError, match="--decode-only-hit nan"):
        Disagg(decode_hit=float("nan"))
    with pytest.raises(ValueError, match="unknown pairing policy 'best'"):
        Policy("best")


def test_without_events_cache_aware_follows_its_own_routing():
    """A worker whose events are not followed is credited with the prompts the router sent it (LRU-bounded)."""
    idx = KVIndex(approx_block_size=16, approx_blocks=30)
    pre, dec = pools()
    pol = Policy("cache_aware", idx, Disagg(decode_hit=2.0))
    systems = [prompt(s, 256) for s in range(4)]
    first, busy = {}, []
    for s, sys in enumerate(systems):  # the first request of each system prompt: spread by load
        d = pol.decide(pre, dec, sys + prompt(100 + s, 32))
        pol.routed(d, sys + prompt(100 + s, 32))
        busy.append(d.prefill.hold(tokens=1000))  # still busy: the next system prompt goes to the other worker
        first[s] = d.prefill
    for load in busy:
        load.release()
    for s, sys in enumerate(systems[2:], start=2):  # later users of the same system prompt: the same worker
        assert pol.decide(pre, dec, sys + prompt(200 + s, 32)).prefill is first[s]
    # the oldest blocks were pushed out (30 per worker, two 18-block prompts each): the prefix is gone
    assert idx.match(first[0].url, prompt_hashes(systems[0], [16])).blocks == {}
    # negative control: round robin records nothing and ignores the cache
    rr = Policy("round_robin", KVIndex(), Disagg(decode_hit=2.0))
    d = rr.decide(pre, dec, systems[0])
    rr.routed(d, systems[0])
    assert rr.index.stats() == {"orphans": 0, "malformed": 0, "events": 0}


def test_tenants_are_told_apart_by_their_cache_salt():
    """A tenant's blocks (its salt in the first block's extra keys, as vLLM publishes it) credit that tenant
    only: the same tokens under another salt, or none, are neither credited nor routed past the prefill."""
    idx = KVIndex()
    sys = prompt(1, 256)
    publish(idx, D[1], sys, salt="alice")
    publish(idx, STORE, sys, "CPU_TIER1", base=5000, block_size=128, salt="alice")
    pre, dec = pools()
    pol = Policy("cache_aware", idx, Disagg(decode_hit=0.8, store_whole=True))
    assert pol.decide(pre, dec, sys, salt="alice").reason == "decode_holds_prefix"  # the owner hits
    for other in ("", "bob"):
        d = pol.decide(pre, dec, sys, salt=other)
        assert d.reason == "pd" and d.prefill_tokens == 256, other
    idx2 = KVIndex()  # the store alone holds alice's prompt: her request skips the prefill, bob's does not
    publish(idx2, STORE, sys, "CPU_TIER1", base=5000, block_size=128, salt="alice")
    pol2 = Policy("cache_aware", idx2, Disagg(decode_hit=0.8, store_whole=True))
    assert pol2.decide(pre, dec, sys, salt="alice").reason == "store_holds_prompt"
    assert pol2.decide(pre, dec, sys, salt="bob").reason == "pd"
