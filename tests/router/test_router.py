"""Router: both legs, kv_transfer_params hand-off, failover, health, bad input.

The workers here are small aiohttp apps that speak the engines' HTTP contract and record what they
received, so the router's choices can be checked exactly; tests/test_up_demo.py runs real engines.
"""

import asyncio
import json
import socket

import aiohttp
import pytest
from aiohttp import web

from kvrelay.router.pool import NoWorkerError, Pool
from kvrelay.router.server import Router


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Worker:
    def __init__(self, role: str, status: int = 200, params: dict | None = None, stream_chunks: int = 0):
        self.role, self.status, self.params, self.stream_chunks = role, status, params, stream_chunks
        self.bodies: list[dict] = []
        self.received = asyncio.Event()  # set once a request came in (a prefill "published")
        self.wait_for: asyncio.Event | None = None  # a decode waits for its prefill, as on the store
        self.app = web.Application()
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_post("/v1/chat/completions", self.completions)
        self.app.router.add_get("/healthz", self.healthz)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if self.status == 200:
            self.received.set()
        if self.wait_for is not None:
            await asyncio.wait_for(self.wait_for.wait(), 10)
        if self.status != 200:
            return web.json_response({"error": "boom"}, status=self.status)
        if self.stream_chunks and body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(self.stream_chunks):
                await resp.write(f"data: {json.dumps({'i': i})}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        out = {"choices": [{"text": self.role, "token_ids": [1]}], "received": body}
        if self.params is not None:
            out["kv_transfer_params"] = self.params
        return web.json_response(out)

    async def start(self) -> str:
        self.runner = web.AppRunner(self.app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        await self.runner.cleanup()


async def _with_router(prefill_urls, decode_urls, fn):
    router = Router(Pool("prefill", prefill_urls), Pool("decode", decode_urls), health_interval=3600)
    runner = web.AppRunner(router.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    try:
        async with aiohttp.ClientSession() as session:
            return await fn(router, session, url)
    finally:
        await runner.cleanup()


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
                assert not router.prefill.workers[0].healthy
                assert "HTTP 500" in router.prefill.workers[0].last_error
                assert router.failovers.labels("prefill")._value.get() == 1
            await _with_router(urls[:2], urls[2:], fn)
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
                    w.healthy = True  # the startup health check marked it down; force the passive path
                async with session.post(url + "/v1/completions", json={"prompt": "hi"}) as r:
                    body = await r.json()
                assert r.status == 200 and body["choices"][0]["text"] == "decode"
                assert "kv_transfer_params" not in body["received"]
                assert not router.prefill.workers[0].healthy
                assert not router.decode.workers[0].healthy and router.decode.workers[1].healthy
            await _with_router([dead_prefill], [dead_decode, url_dec], fn)
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
                expect = b"".join(f"data: {json.dumps({'i': i})}\n\n".encode() for i in range(5)) + b"data: [DONE]\n\n"
                assert raw == expect
                async with session.post(url + "/v1/completions", data=b"{not json") as r:
                    assert r.status == 400 and "not valid JSON" in (await r.json())["error"]["message"]
                async with session.get(url + "/readyz") as r:
                    assert r.status == 200
                async with session.get(url + "/metrics") as r:
                    assert b"kvrelay_router_requests" in await r.read()
            await _with_router(urls[:1], urls[1:], fn)
        finally:
            for w in (pre, dec):
                await w.stop()
    asyncio.run(main())


def test_pool_errors_name_the_workers():
    pool = Pool("decode", ["http://127.0.0.1:1"])
    pool.mark_failed(pool.workers[0], "connection refused")
    with pytest.raises(NoWorkerError, match=r"no healthy decode worker.*127.0.0.1:1 \(down: connection refused\)"):
        pool.pick()
    with pytest.raises(ValueError, match="unknown pairing policy 'random'"):
        Pool("decode", [], policy="random")
