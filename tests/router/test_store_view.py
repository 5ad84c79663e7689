"""The router's view of the store (issue 13): while the store does not answer pings, each request goes to
a decode worker alone (no prefill leg, no do_remote_prefill: it computes at once instead of waiting out
a pull deadline); once it answers again, P/D resumes.  A fake store answers the protocol's Ping on
127.0.0.1; one test pings a real `kvrelay store` daemon."""

import asyncio
import time

import pytest
from router_fakes import FakeStore, Worker, with_router
from waiting import await_until

from kvrelay.router.store import StoreWatch
from kvrelay.store.process import DaemonProcess


async def _until(cond, limit: float = 3.0) -> float:
    """Seconds until ``cond()`` holds (TimeoutError past ``limit``)."""
    t0 = time.monotonic()
    await await_until(cond, limit, "the router's view of the store")
    return time.monotonic() - t0


@pytest.mark.timeout(60)
def test_store_down_sends_requests_to_decode_alone_and_pd_resumes_when_it_is_back():
    async def main():
        store = FakeStore()
        await store.start()
        pre = Worker("prefill", params={"block_hashes": []})
        dec = Worker("decode")
        urls = [await w.start() for w in (pre, dec)]
        watch = StoreWatch(store.address, timeout=0.3, interval=0.3, probe_interval=0.2)
        try:
            async def fn(router, session, url):
                def sample(name, **labels):
                    return router.metrics.registry.get_sample_value(name, labels)

                async def ask() -> dict:
                    async with session.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}) as r:
                        assert r.status == 200
                        return (await r.json())["received"]

                assert watch.up and store.pings >= 1
                got = await ask()
                assert len(pre.bodies) == 1 and got["kv_transfer_params"]["do_remote_prefill"] is True
                await store.stop()  # kill -9 of the store
                down = await _until(lambda: not watch.up)
                print(f"\nstore seen down after {down:.3f}s (it dropped the connection)")
                for _ in range(3):
                    got = await ask()
                    assert got == {"prompt": "hi", "max_tokens": 3}, "decode alone: the client's request as sent"
                assert len(pre.bodies) == 1, "no prefill leg while the store is down"
                assert sample("kvrelay_router_routes_total", route="decode_only_store_down") == 3
                assert sample("kvrelay_router_store_up") == 0
                assert sample("kvrelay_router_breaker_open", role="store", worker=store.address) == 1
                async with session.get(url + "/readyz") as r:
                    ready = await r.json()
                assert r.status == 200 and ready["store"]["up"] is False and ready["store"]["state"] == "open"
                assert any(why in ready["store"]["last_error"] for why in ("dropped its connection", "TimeoutError"))
                await store.start()  # the store restarts on its port
                back = await _until(lambda: watch.up)
                print(f"store back in service {back:.3f}s after it listened again")
                assert back < 1.5
                got = await ask()
                assert len(pre.bodies) == 2 and got["kv_transfer_params"]["do_remote_prefill"] is True
                assert sample("kvrelay_router_routes_total", route="pd") == 2
                assert sample("kvrelay_router_store_up") == 1
                assert sample("kvrelay_router_breaker_opened_total", role="store", worker=store.address) == 1
            await with_router(urls[:1], urls[1:], fn, store=watch)
        finally:
            await store.stop()
            for w in (pre, dec):
                await w.stop()
    asyncio.run(main())


@pytest.mark.timeout(120)
def test_store_watch_pings_a_real_store_daemon():
    daemon = DaemonProcess(pool_size="16MiB", transports="shm").start()

    async def main():
        watch = StoreWatch(daemon.address, timeout=0.5)
        try:
            assert await watch.check() and watch.up and watch.pings == 1
            daemon.stop()
            t0 = time.monotonic()
            assert not await watch.check() and not watch.up
            assert time.monotonic() - t0 < 2
        finally:
            await watch.stop()
    try:
        asyncio.run(main())
    finally:
        daemon.stop()
