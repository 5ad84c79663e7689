"""Cache-aware routing end to end: KV events over ZeroMQ from real publishers (kvrelay.events) build the
router's index; the router then routes requests by it, through fake workers that record what they got.
"""

import asyncio

import pytest
from router_fakes import Worker, with_router
from waiting import await_until

from kvrelay.events.publisher import EventPublisher
from kvrelay.events.wire import stored
from kvrelay.router.cacheview import CacheView, EventSource
from kvrelay.router.policy import STORE, Disagg, Policy
from kvrelay.router.server import main as router_main

BS = 16


def blocks(tokens, block_size, medium, base):
    """BlockStored events for ``tokens`` (one per block, publisher hashes base+i)."""
    out, parent = [], None
    for i in range(0, len(tokens), block_size):
        out.append(stored([base + i], parent, tokens[i:i + block_size], block_size, medium))
        parent = base + i
    return out


async def _wait(pred, timeout=20.0):
    await await_until(pred, timeout, "the router's index following the events")


@pytest.mark.timeout(120)
def test_router_routes_by_the_events_it_follows():
    system = list(range(300, 300 + 8 * BS))  # 128 tokens: 8 blocks of 16, one store chunk of 128
    held_by_store = list(range(5000, 5000 + 200))  # a prompt the store holds whole (partial last chunk too)

    async def main():
        pres = [Worker("prefill", params={"block_hashes": []}) for _ in range(2)]
        decs = [Worker("decode") for _ in range(2)]
        urls = [await w.start() for w in pres + decs]
        pubs = {name: EventPublisher().start() for name in (urls[1], urls[3], STORE)}
        cache = CacheView([EventSource(n, p.endpoint, p.replay_endpoint) for n, p in pubs.items()])
        policy = Policy("cache_aware", cache.index, Disagg(min_prefill_tokens=32, decode_hit=0.8))
        try:
            pubs[urls[1]].publish(blocks(system, BS, "GPU", 100))  # prefill worker 1 holds the system prompt
            pubs[urls[3]].publish(blocks(system, BS, "GPU", 900))  # so does decode worker 1
            pubs[STORE].publish(blocks(held_by_store, 128, "CPU_TIER1", 7000))

            async def fn(router, session, url):
                idx = cache.index
                await _wait(lambda: {f"blocks_{n}" for n in pubs} <= set(idx.stats()))

                async def ask(prompt):
                    async with session.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 2}) as r:
                        assert r.status == 200, await r.text()
                        return (await r.json())["received"]
                # 1. a long prompt on the system prompt: P/D, prefill on worker 1 (it holds 128 of 192 tokens)
                got = await ask(system + list(range(64)))
                assert got["kv_transfer_params"]["do_remote_prefill"] is True
                assert len(pres[1].bodies) == 1 and not pres[0].bodies
                # 2. short: decode alone, no transfer params, no prefill leg
                got = await ask(list(range(20)))
                assert "kv_transfer_params" not in got and len(pres[0].bodies) + len(pres[1].bodies) == 1
                # 3. decode worker 1 holds 128 of 140 tokens: it computes the rest alone
                before = len(decs[1].bodies)
                got = await ask(system + list(range(12)))
                assert "kv_transfer_params" not in got and len(decs[1].bodies) == before + 1
                # 4. the store holds it whole: the decode pulls it, no prefill leg
                got = await ask(held_by_store)
                assert got["kv_transfer_params"]["do_remote_prefill"] is True
                assert len(pres[0].bodies) + len(pres[1].bodies) == 1
                routes = {k: router.metrics.routes.labels(k)._value.get()
                          for k in ("pd", "short_prompt", "decode_holds_prefix", "store_holds_prompt")}
                assert routes == {"pd": 1, "short_prompt": 1, "decode_holds_prefix": 1, "store_holds_prompt": 1}
                async with session.get(url + "/metrics") as r:
                    page = await r.text()
                assert "kvrelay_router_decode_only_below_tokens 32.0" in page
                assert f'kvrelay_router_index_blocks{{source="{STORE}"}} 2.0' in page
            await with_router(urls[:2], urls[2:], fn, policy=policy, cache=cache)
        finally:
            for p in pubs.values():
                p.close()
            for w in pres + decs:
                await w.stop()
    asyncio.run(main())


@pytest.mark.parametrize("argv, message", [
    (["--events", "tcp://127.0.0.1:5557"], "give NAME=PUB[,REPLAY]"),
    (["--events", "http://127.0.0.1:7=tcp://127.0.0.1:5557"], "is neither a --prefill or --decode URL nor 'store'"),
    (["--events", "store=udp://127.0.0.1:5557"], "is not tcp://HOST:PORT"),
    (["--events", "store=tcp://127.0.0.1:1,tcp://127.0.0.1:2,tcp://127.0.0.1:3"], "at most two endpoints"),
    (["--decode-only-hit", "0"], "--decode-only-hit 0: must be a fraction"),
    (["--decode-only-below", "-3"], "--decode-only-below -3"),
    (["--overlap-weight", "-1"], "--overlap-weight -1"),
    (["--tokenizer", "/nonexistent/ckpt"], "--tokenizer '/nonexistent/ckpt' is not a directory"),
])
def test_cache_flags_are_checked(argv, message, capsys):
    assert router_main(["--decode", "http://127.0.0.1:1", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
