"""Fake workers and a router on 127.0.0.1 for the router tests.

A fake worker is a small aiohttp app that speaks the engines' HTTP contract, records what it received
(and when), and can be told to fail: answer 500, die (drop the connection) before it answers or after
``die_after`` stream events, or stop and come back on the same port.  Workers and the router serve
through `kvrelay.serving.start_serving`, as the real processes do (a handler whose client disconnects is
cancelled: a fake worker counts those in ``closed``).
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import zmq
import zmq.asyncio
from aiohttp import web

from kvrelay.router.pool import Pool
from kvrelay.router.retry import RetryPolicy
from kvrelay.router.server import Router
from kvrelay.router.store import StoreWatch
from kvrelay.serving import start_serving
from kvrelay.store import protocol as P


class Worker:
    def __init__(self, role: str, status: int = 200, params: dict | None = None, stream_chunks: int = 0,
                 die_before: bool = False, die_after: int | None = None, cut_body: bool = False):
        self.role, self.status, self.params, self.stream_chunks = role, status, params, stream_chunks
        self.die_before, self.die_after, self.cut_body = die_before, die_after, cut_body
        self.health_status = 200
        self.chunk_delay = 0.0  # seconds between stream events
        self.delay = 0.0  # seconds before answering
        self.peers: set[tuple] = set()  # client (host, port) of each connection seen: connections opened
        self.active = self.max_active = 0  # requests in progress now, and at most
        self.bodies: list[dict] = []
        self.times: list[float] = []  # when each request came in (monotonic)
        self.health_checks = 0
        self.closed = 0  # requests whose client (the router) closed the connection before the answer
        self.received = asyncio.Event()  # set once a request came in (a prefill "published")
        self.wait_for: asyncio.Event | None = None  # a decode waits for its prefill, as on the store
        self.port = 0
        self.app = web.Application()
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_post("/v1/chat/completions", self.completions)
        self.app.router.add_get("/healthz", self.healthz)

    async def healthz(self, request: web.Request) -> web.Response:
        self.health_checks += 1
        return web.json_response({"ok": self.health_status == 200}, status=self.health_status)

    def _chunk(self, i: int) -> bytes:
        event = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m",
                 "choices": [{"index": 0, "text": f"t{i} ", "finish_reason": None}], "i": i}
        return f"data: {json.dumps(event)}\n\n".encode()

    async def completions(self, request: web.Request) -> web.StreamResponse:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            return await self._completions(request)
        except asyncio.CancelledError:  # the router closed this request (start_serving cancels the handler)
            self.closed += 1
            raise
        finally:
            self.active -= 1

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        self.peers.add(request.transport.get_extra_info("peername"))
        body = await request.json()
        if self.delay:
            await asyncio.sleep(self.delay)
        self.bodies.append(body)
        self.times.append(time.monotonic())
        if self.status == 200 and not self.die_before:
            self.received.set()
        if self.wait_for is not None:
            await asyncio.wait_for(self.wait_for.wait(), 10)
        if self.die_before:
            request.transport.close()  # the process died: the connection drops, nothing was answered
            return web.Response()
        if self.status != 200:
            return web.json_response({"error": "boom"}, status=self.status)
        if self.cut_body and not body.get("stream"):  # headers and half the body, then the process dies
            resp = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "1000"})
            await resp.prepare(request)
            await resp.write(b'{"choices": [{"text": "cut')
            request.transport.close()
            return resp
        if self.stream_chunks and body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(self.stream_chunks):
                if self.die_after is not None and i == self.die_after:
                    await resp.write(self._chunk(i)[:20])  # half an event, then the process dies
                    request.transport.close()
                    return resp
                await resp.write(self._chunk(i))
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        out = {"choices": [{"text": self.role, "token_ids": [1]}], "received": body}
        if self.params is not None:
            out["kv_transfer_params"] = self.params
        return web.json_response(out)

    async def start(self) -> str:
        self.runner = await start_serving(self.app, "127.0.0.1", self.port)
        self.port = self.runner.addresses[0][1]
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()


async def with_router(prefill_urls, decode_urls, fn, *, store: StoreWatch | None = None,
                      retry: RetryPolicy | None = None, breaker_failures: int = 10, health_interval: float = 3600,
                      probe_interval: float = 0.2, **kw):
    """Run ``fn(router, session, url)`` against a router over the given workers, on 127.0.0.1 (``kw``: more
    of Router's keyword arguments)."""
    router = Router(Pool("prefill", prefill_urls, breaker_failures=breaker_failures),
                    Pool("decode", decode_urls, breaker_failures=breaker_failures), health_interval=health_interval,
                    retry=retry, probe_interval=probe_interval, store=store, **kw)
    runner = await start_serving(router.app, "127.0.0.1", 0)  # as `kvrelay router` serves
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            return await fn(router, session, url)
    finally:
        await runner.cleanup()


class FakeStore:
    """A ZMQ ROUTER on 127.0.0.1 that answers the store protocol's anonymous Ping as the daemon does; it can
    stop (the store died) and start again on the same port."""

    def __init__(self) -> None:
        self.port = 0
        self.pings = 0
        self.task: asyncio.Task | None = None

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    async def start(self) -> str:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if self.port:
            for _ in range(50):  # the old listener's port may take a moment to be free
                try:
                    self.sock.bind(self.address)
                    break
                except zmq.ZMQError:
                    await asyncio.sleep(0.05)
            else:
                raise RuntimeError(f"could not bind {self.address} again")
        else:
            self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.task = asyncio.create_task(self._serve())
        return self.address

    async def _serve(self) -> None:
        while True:
            ident, data = await self.sock.recv_multipart()
            req = P.decode_request(data)
            assert isinstance(req, P.Ping), req
            self.pings += 1
            await self.sock.send_multipart([ident, P.encode(P.Reply(req_id=req.req_id))])

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.sock.close(linger=0)
        self.ctx.destroy(linger=0)
