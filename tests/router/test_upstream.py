"""The router legs' HTTP client (kvrelay/router/upstream.py) against a real aiohttp server on 127.0.0.1:
answers read whole and streamed byte-exact, a kept-alive connection reused, a refused connect and a cut
answer reported as the worker being gone, and the request deadline."""

import asyncio
import socket

import pytest
from aiohttp import web

from kvrelay.router.upstream import ConnectFailed, ConnectionClosed, Upstream
from kvrelay.serving import start_serving


async def _server() -> tuple[web.AppRunner, str, set]:
    peers: set = set()

    async def echo(request: web.Request) -> web.StreamResponse:
        peers.add(request.transport.get_extra_info("peername"))
        body = await request.read()
        if request.path == "/stream":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(5):
                await resp.write(b"data: %d\n\n" % i)
            await resp.write_eof()
            return resp
        if request.path == "/cut":
            resp = web.StreamResponse(headers={"Content-Length": "100"})
            await resp.prepare(request)
            await resp.write(b"x" * 10)
            request.transport.close()
            return resp
        if request.path == "/slow":
            await asyncio.sleep(5)
        return web.Response(body=body[::-1], status=201, content_type="application/json")

    app = web.Application()
    app.router.add_post("/{tail:.*}", echo)
    runner = await start_serving(app, "127.0.0.1", 0)
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}", peers


@pytest.mark.timeout(60)
def test_answers_streams_reuse_and_failures():
    async def run() -> None:
        runner, url, peers = await _server()
        up = Upstream(limit=4, timeout=1.0)
        try:
            for _ in range(3):
                async with up.post(url + "/echo", b'{"a": 1}') as r:
                    assert (r.status, r.content_type, await r.read()) == (201, "application/json",
                                                                          b'}1 :"a"{')
            async with up.post(url + "/stream", b"{}") as r:
                got = b""
                while chunk := await r.readany():
                    got += chunk
                assert r.content_type == "text/event-stream" and got == b"".join(b"data: %d\n\n" % i for i in range(5))
            assert len(peers) == 1, f"{len(peers)} connections for 4 sequential requests"
            with pytest.raises(ConnectionClosed):
                async with up.post(url + "/cut", b"{}") as r:
                    await r.read()
            with pytest.raises(TimeoutError):
                async with up.post(url + "/slow", b"{}") as r:
                    await r.read()
            with socket.socket() as s:  # a port nothing listens on
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            with pytest.raises(ConnectFailed):
                async with up.post(f"http://127.0.0.1:{port}/x", b"{}") as r:
                    pass
        finally:
            await up.close()
            await runner.cleanup()
    asyncio.run(run())


@pytest.mark.timeout(60)
def test_a_kept_alive_connection_the_worker_closed_is_retried_once_on_a_new_one():
    """The worker's keep-alive timeout races the next request: it closes the idle connection as the request
    arrives, answering nothing.  The request goes out again on a new connection (the worker never took it);
    a new connection closed before any answer is the worker being gone (no retry loop)."""
    async def main() -> None:
        conns: list[int] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conns.append(0)
            me = len(conns) - 1
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(
                    b"content-length")))
                body = await reader.readexactly(length)
                conns[me] += 1
                if conns[me] > 1 or body == b"close":  # the idle close racing the second request
                    writer.close()
                    return
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
                await writer.drain()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/completions"
        up = Upstream(limit=0, timeout=10)
        try:
            for body in (b'{"a": 1}', b'{"b": 2}'):
                async with up.post(url, body) as r:
                    assert r.status == 200 and await r.read() == body
            assert len(conns) == 2  # the second went out again on a new connection
            with pytest.raises(ConnectionClosed):
                async with up.post(url, b"close") as r:
                    await r.read()
        finally:
            await up.close()
            server.close()
            await server.wait_closed()

    asyncio.run(main())
