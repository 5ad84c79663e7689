"""Router: both legs, kv_transfer_params hand-off, failover, health, bad input.

The workers here are small aiohttp apps that speak the engines' HTTP contract and record what they
received, so the router's choices can be checked exactly; tests/test_up_demo.py runs real engines.
"""

import asyncio
import socket

import pytest
from router_fakes import Worker, with_router

from kvrelay.router.pool import NoWorkerError, Pool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(60)
def test_params_flow_and_prefill_failover():
    async def main():
        bad = Worker("prefill", status=500)
        good = Worker("prefill", params={"request_id": "r", "block_hashes": ["ab"]})
        dec = Worker("decode")
        urls = [await w.start() for w in (bad, good, dec)]
        dec.wait_for = good.received
        try:
            async def fn(router, session, url):
                router.prefill.policy = "round_robin"
                router.prefill._rr = iter(range(0, 100))  # first pick: the failing worker
                async with session.post(url + "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 7}) as r:
                    body = await r.json()
                assert r.status == 200
                assert bad.bodies and good.bodies, "the failing prefill worker must be tried, then the next"
                assert good.bodies[0]["max_tokens"] == 1 and good.bodies[0]["stream"] is False
                rid = good.bodies[0]["request_id"]
                assert good.bodies[0]["kv_transfer_params"] == {"do_remote_decode": True, "kvrelay_request_id": rid}
                # Both legs run under one request id; the decode derives the chunk addresses itself.
                assert body["received"]["kv_transfer_params"] == {"do_remote_prefill": True, "kvrelay_request_id": rid}
                assert body["received"]["request_id"] == good.bodies[0]["request_id"] == bad.bodies[0]["request_id"]
                assert body["received"]["max_tokens"] == 7
                # one 500 is one failure: the worker stays in service until --breaker-failures in a row
                assert router.prefill.workers[0].healthy and router.prefill.workers[0].breaker.consecutive == 1
                assert "HTTP 500" in router.prefill.workers[0].last_error
                assert router.prefill.workers[1].breaker.consecutive == 0
                assert router.metrics.retries.labels("prefill")._value.get() == 1
            await with_router(urls[:2], urls[2:], fn)
        finally:
            for w in (bad, good, dec):
                await w.stop()
    asyncio.run(main())


@pytest.mark.timeout(60)
def test_no_prefill_left_decode_recomputes_and_dead_decode_fails_over():
    async def main():
        dec = Worker("decode")
        url_dec = await dec.start()
        dead_prefill = f"http://127.0.0.1:{_free_port()}"
        dead_decode = f"http://127.0.0.1:{_free_port()}"
        try:
            async def fn(router, session, url):
                router.decode.policy = "round_robin"
                router.decode._rr = iter(range(0, 100))  # first pick: the dead decode worker
                for w in router.decode.workers:
                    w.breaker.probe_ok()  # the startup health check marked it down; force the passive path
                async with session.post(url + "/v1/completions", json={"prompt": "hi"}) as r:
                    body = await r.json()
                assert r.status == 200 and body["choices"][0]["text"] == "decode"
                assert "kv_transfer_params" not in body["received"]
                assert not router.prefill.workers[0].healthy
                assert not router.decode.workers[0].healthy and router.decode.workers[1].healthy
            await with_router([dead_prefill], [dead_decode, url_dec], fn)
        finally:
            await dec.stop()
    asyncio.run(main())


@pytest.mark.timeout(60)
def test_streaming_is_relayed_byte_for_byte_and_bad_input_is_refused():
    async def main():
        pre = Worker("prefill", params={"block_hashes": []})
        dec = Worker("decode", stream_chunks=5)
        urls = [await w.start() for w in (pre, dec)]
        try:
            async def fn(router, session, url):
                async with session.post(url + "/v1/completions", json={"prompt": "x", "stream": True}) as r:
                    raw = await r.read()
                assert r.headers["Content-Type"].startswith("text/event-stream")
                expect = b"".join(dec._chunk(i) for i in range(5)) + b"data: [DONE]\n\n"
                assert raw == expect
                async with session.post(url + "/v1/completions", data=b"{not json") as r:
                    assert r.status == 400 and "not valid JSON" in (await r.json())["error"]["message"]
                async with session.get(url + "/readyz") as r:
                    assert r.status == 200
                async with session.get(url + "/metrics") as r:
                    assert b"kvrelay_router_requests" in await r.read()
            await with_router(urls[:1], urls[1:], fn)
        finally:
            for w in (pre, dec):
                await w.stop()
    asyncio.run(main())


def test_pool_errors_name_the_workers():
    pool = Pool("decode", ["http://127.0.0.1:1"])
    pool.mark_failed(pool.workers[0], "connection refused", fatal=True)
    with pytest.raises(NoWorkerError, match=r"no healthy decode worker.*127.0.0.1:1 \(down: connection refused\)"):
        pool.pick()
    with pytest.raises(ValueError, match="unknown pairing policy 'random'"):
        Pool("decode", [], policy="random")
