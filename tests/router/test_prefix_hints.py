"""Prefix reuse across hosts, the router's part (issue 23): with a store on every host, the router follows each
store's KV events under its control address and hints a request at the store holding the longest prefix of it.
End to end through real event publishers (ZeroMQ) and fake workers that record what they got: a prompt whose
prefix one store holds goes to a decode worker alone, with that store and the prefix's tokens in its
``kv_transfer_params``; one a store holds whole is pulled from that store (no prefill leg); one no store holds
goes P/D.  Over a synthetic index: the longest prefix wins, the decode_hit threshold holds, a store whose
breaker is open is never hinted at.
"""

import asyncio

import pytest
from router_fakes import Worker, with_router
from waiting import await_until

from kvrelay.events.publisher import EventPublisher
from kvrelay.events.wire import make_batch, stored
from kvrelay.params import PREFIX_STORE, PREFIX_TOKENS, STORE_ADDRESS
from kvrelay.router.cacheview import CacheView, EventSource, parse_events
from kvrelay.router.kvindex import KVIndex, prompt_hashes
from kvrelay.router.policy import Disagg, Policy
from kvrelay.router.pool import Pool

BS = 16
S1, S2 = "tcp://198.18.0.2:5600", "tcp://198.18.0.3:5600"  # two hosts' stores (names only: nothing connects)


def blocks(tokens, medium="CPU_TIER1", base=0):
    out, parent = [], None
    for i in range(0, len(tokens), BS):
        out.append(stored([base + i], parent, tokens[i:i + BS], BS, medium))
        parent = base + i
    return out


def test_events_may_name_a_store_by_its_address():
    assert parse_events(f"{S1}=tcp://127.0.0.1:5557", set()).name == S1
    with pytest.raises(ValueError, match="nor 'store'"):
        parse_events("tcp://host-without-port=tcp://127.0.0.1:5557", set())


@pytest.mark.timeout(120)
def test_the_router_hints_at_the_store_holding_the_prefix():
    shared = list(range(300, 300 + 256))
    whole = list(range(5000, 5000 + 200))

    async def main():
        pres = [Worker("prefill", params={"block_hashes": []})]
        decs = [Worker("decode")]
        urls = [await w.start() for w in pres + decs]
        pubs = {name: EventPublisher().start() for name in (S1, S2)}
        cache = CacheView([EventSource(n, p.endpoint, p.replay_endpoint) for n, p in pubs.items()])
        policy = Policy("cache_aware", cache.index, Disagg(decode_hit=0.8))
        try:
            pubs[S1].publish(blocks(shared, base=100))
            pubs[S2].publish(blocks(shared[:128], base=100))  # a shorter prefix: S1 wins
            pubs[S2].publish(blocks(whole, base=9000))

            async def fn(router, session, url):
                idx = cache.index
                await await_until(lambda: {f"blocks_{S1}", f"blocks_{S2}"} <= set(idx.stats()), 20, "the index")

                async def ask(prompt):
                    async with session.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 2}) as r:
                        assert r.status == 200, await r.text()
                        return (await r.json())["received"]
                # 1. S1 holds 256 of 300 tokens: decode alone, told to load them from S1
                got = await ask(shared + list(range(44)))
                assert got["kv_transfer_params"][PREFIX_STORE] == S1
                assert got["kv_transfer_params"][PREFIX_TOKENS] == 256
                assert "do_remote_prefill" not in got["kv_transfer_params"] and not pres[0].bodies
                # 2. S2 holds a prompt whole: the decode pulls it from S2, no prefill leg
                got = await ask(whole)
                assert got["kv_transfer_params"]["do_remote_prefill"] is True
                assert got["kv_transfer_params"][STORE_ADDRESS] == S2 and not pres[0].bodies
                # 3. the prefix is too small a part (256 of 400 < 0.8): P/D, no hint (negative control)
                got = await ask(shared + list(range(144)))
                assert PREFIX_STORE not in got["kv_transfer_params"]
                await await_until(lambda: len(pres[0].bodies) == 1, 10, "the prefill leg")  # sent beside the decode's
                routes = {k: router.metrics.routes.labels(k)._value.get()
                          for k in ("pd", "store_holds_prefix", "store_holds_prompt")}
                assert routes == {"pd": 1, "store_holds_prefix": 1, "store_holds_prompt": 1}
            await with_router(urls[:1], urls[1:], fn, policy=policy, cache=cache)
        finally:
            for p in pubs.values():
                p.close()
            for w in pres + decs:
                await w.stop()
    asyncio.run(main())


def test_hints_prefer_the_longest_prefix_in_memory_and_skip_stores_that_are_down():
    idx = KVIndex()
    sys = list(range(1000, 1000 + 192))
    for i in range(0, len(sys), BS):  # S1 on disk, S2 in memory, same length; a third store holds less
        parent = None if i == 0 else i - BS
        idx.apply(S1, make_batch([stored([i], parent, sys[i:i + BS], BS, "DISK")]))
        idx.apply(S2, make_batch([stored([i], parent, sys[i:i + BS], BS, "CPU_TIER1")]))
    idx.apply("tcp://198.18.0.4:5600", make_batch([stored([0], None, sys[:BS], BS, "CPU_TIER1")]))
    policy = Policy("cache_aware", idx, Disagg(decode_hit=0.8))
    policy.followed = {S1, S2, "tcp://198.18.0.4:5600", "http://127.0.0.1:9101"}
    user = sys + list(range(20))
    h = prompt_hashes(user, [BS])
    hint = policy.hint(h, len(user))
    assert hint is not None and (hint.store, hint.tokens, hint.whole) == (S2, 192, False)
    policy.store_up = lambda address: address != S2  # S2's breaker is open: the disk copy on S1 serves
    assert policy.hint(h, len(user)).store == S1  # type: ignore[union-attr]
    d = policy.decide(Pool("prefill", ["http://127.0.0.1:9001"]), Pool("decode", ["http://127.0.0.1:9101"]), user)
    assert d.reason == "store_holds_prefix" and d.prefix is not None and d.prefix.store == S1 and not d.pull
    policy.store_up = lambda address: False
    assert policy.hint(h, len(user)) is None
    assert policy.decide(Pool("prefill", ["http://127.0.0.1:9001"]), Pool("decode", ["http://127.0.0.1:9101"]),
                         user).reason == "pd"
    assert Policy("cache_aware", idx).hint(h, len(user)) is None  # no store followed: no hint
