"""The router's upstream connections: a prefill leg outlived by its decode keeps its pooled connection,
each leg has its own connection limit (no shared cap of 100), and the flags are checked.

Connections are counted on the fake workers (each distinct client port is one connection opened).
"""

import asyncio

import pytest
from router_fakes import Worker, with_router

from kvrelay.router.server import main as router_main

REQUESTS = 24
CONCURRENCY = 4


async def _prefill_connections(drain: float) -> tuple[int, dict]:
    """Connections the prefill worker saw for REQUESTS requests whose decode answers before their prefill."""
    pre = Worker("prefill", params={"block_hashes": []})
    pre.delay = 0.15  # the decode (no wait) is answered first: every prefill leg is outlived
    dec = Worker("decode", stream_chunks=3)
    urls = [await w.start() for w in (pre, dec)]
    try:
        async def fn(router, session, url):
            async def one(i):
                async with session.post(url + "/v1/completions", json={"prompt": f"p{i}", "stream": True}) as r:
                    assert r.status == 200
                    assert (await r.read()).endswith(b"data: [DONE]\n\n")
            for start in range(0, REQUESTS, CONCURRENCY):  # rounds of CONCURRENCY requests
                await asyncio.gather(*(one(i) for i in range(start, start + CONCURRENCY)))
                for _ in range(200):  # the outlived prefill legs end in the background
                    if not router._draining:
                        break
                    await asyncio.sleep(0.02)
            drained = {o: router.metrics.prefill_drained.labels(o)._value.get() for o in ("finished", "cancelled")}
            return len(pre.peers), drained
        return await with_router(urls[:1], urls[1:], fn, prefill_drain=drain)
    finally:
        for w in (pre, dec):
            await w.stop()


@pytest.mark.timeout(120)
def test_outlived_prefill_legs_keep_their_connections():
    opened, drained = asyncio.run(_prefill_connections(drain=30.0))
    assert drained == {"finished": REQUESTS, "cancelled": 0}
    assert opened <= CONCURRENCY + 2, f"{opened} prefill connections for {REQUESTS} requests"
    # negative control: cancelling each outlived leg at once closes its connection
    opened, drained = asyncio.run(_prefill_connections(drain=0.0))
    assert drained == {"finished": 0, "cancelled": REQUESTS}
    assert opened >= REQUESTS - 1, f"cancelled legs reused connections ({opened} for {REQUESTS})"


async def _max_decode_streams(streams: int, **kw) -> int:
    pre = Worker("prefill", params={"block_hashes": []})
    dec = Worker("decode", stream_chunks=2)
    dec.wait_for = asyncio.Event()  # held until every stream is open at once (or no more arrive for 1 s)
    urls = [await w.start() for w in (pre, dec)]
    try:
        async def release():
            seen, still = 0, 0
            while dec.active < streams and still < 20:
                await asyncio.sleep(0.05)
                seen, still = dec.active, (still + 1 if dec.active == seen else 0)
            dec.wait_for.set()

        async def fn(router, session, url):
            async def one(i):
                async with session.post(url + "/v1/completions", json={"prompt": f"p{i}", "stream": True}) as r:
                    assert r.status == 200 and (await r.read()).endswith(b"data: [DONE]\n\n")
            await asyncio.gather(release(), *(one(i) for i in range(streams)))
        await with_router(urls[:1], urls[1:], fn, **kw)
        return dec.max_active
    finally:
        for w in (pre, dec):
            await w.stop()


@pytest.mark.timeout(120)
def test_each_leg_has_its_own_connection_limit():
    assert asyncio.run(_max_decode_streams(150)) == 150  # beyond aiohttp's default cap of 100
    assert asyncio.run(_max_decode_streams(150, decode_connections=40)) == 40  # the flag is the cap


@pytest.mark.parametrize("argv, message", [
    (["--decode-connections", "-1"], "--decode-connections -1: must be 0 (no limit)"),
    (["--prefill-connections", "-5"], "--prefill-connections -5"),
    (["--prefill-drain", "nan"], "--prefill-drain nan: must be 0"),
    (["--prefill-drain", "-1"], "--prefill-drain -1"),
])
def test_connection_flags_are_checked(argv, message, capsys):
    assert router_main(["--decode", "http://127.0.0.1:1", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.timeout(120)
def test_least_loaded_spreads_a_burst_over_the_prefill_workers():
    """Requests that arrive together are picked before any of their prefill legs runs: each pick must still
    see the legs picked before it."""
    async def main():
        pres = [Worker("prefill", params={"block_hashes": []}) for _ in range(2)]
        for w in pres:
            w.delay = 0.3
        dec = Worker("decode")
        urls = [await w.start() for w in pres + [dec]]
        try:
            async def fn(router, session, url):
                async def one(i):
                    async with session.post(url + "/v1/completions", json={"prompt": f"p{i}"}) as r:
                        assert r.status == 200
                await asyncio.gather(*(one(i) for i in range(8)))
                for _ in range(100):
                    if not router._draining:
                        break
                    await asyncio.sleep(0.05)
            await with_router(urls[:2], urls[2:], fn)
            return [len(w.bodies) for w in pres]
        finally:
            for w in pres + [dec]:
                await w.stop()
    counts = asyncio.run(main())
    assert sorted(counts) == [4, 4], counts
