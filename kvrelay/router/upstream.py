"""The router's HTTP/1.1 client for the legs: keep-alive connections to the workers, httptools' parser.

aiohttp's client costs the router most of its CPU per request (a request object, header multidicts, a
payload object, a stream reader per answer); the legs need far less: POST a JSON body, read the status, the
Content-Type and the body (whole, or as it comes).  `Upstream` keeps idle connections per worker and at most
``limit`` open at once (0: no limit); a connection goes back to the pool only once its answer was read to
the end and the worker keeps it alive, else it is closed (a cancelled leg closes it: the worker sees its
client leave and aborts the request).  The whole request has a deadline (``timeout``).

Errors: `ConnectFailed` (refused, unreachable) and `ConnectionClosed` (closed or reset before the answer
ended: the worker's process is gone), `BadResponse` (not HTTP), TimeoutError.  Owns: the legs' connections.
Must not touch: retries, breakers (legs.py), relaying to the client (relay.py).
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httptools

HIGH_WATER = 1 << 20  # bytes of an answer buffered before the worker's socket stops being read


class UpstreamError(Exception):
    """A worker could not be reached or did not answer whole."""


class ConnectFailed(UpstreamError):
    """The connection was refused or could not be made."""


class ConnectionClosed(UpstreamError):
    """The worker closed or reset the connection before its answer ended."""


class BadResponse(UpstreamError):
    """The worker's answer is not HTTP/1.1."""


class Response:
    """One answer: ``status``, ``content_type``, and its body through `read` (whole) or `readany`."""

    __slots__ = ("_conn", "status", "content_type")

    def __init__(self, conn: _Conn) -> None:
        self._conn, self.status, self.content_type = conn, conn.status, conn.content_type

    async def readany(self) -> bytes:
        """The body bytes that came since the last call (waiting for some); b"" once it ended."""
        return await self._conn.next_body()

    async def read(self) -> bytes:
        parts = []
        while chunk := await self._conn.next_body():
            parts.append(chunk)
        return b"".join(parts)


class _Conn(asyncio.Protocol):
    def __init__(self, pool: deque[_Conn]) -> None:
        self.pool = pool  # the worker's idle connections (this one is there while idle)
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.status, self.content_type = 0, ""
        self.body: deque[bytes] = deque()
        self.buffered = 0
        self.headers_done = self.complete = self.paused = self.keep_alive = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(BadResponse(f"the worker's answer is not HTTP: {exc}"))
            return
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.pool.remove(self)
        except ValueError:
            pass
        self.transport = None
        if not self.complete:
            why = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
            self._fail(ConnectionClosed(f"the worker closed the connection before its answer ended{why}"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type":
            self.content_type = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)
        self._wake()

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()  # read here: the parser resets after the message
        self.complete = True
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(error)
        self.close()

    def time_out(self, timeout: float) -> None:
        self._fail(TimeoutError(f"no whole answer within {timeout:g} s"))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()
            self.transport = None

    async def _wait(self) -> None:
        if self.error is not None:
            raise self.error
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    # the leg's side
    def send(self, request: bytes) -> None:
        self.status, self.content_type, self.complete, self.headers_done, self.keep_alive = 0, "", False, False, False
        if self.transport is None:
            raise ConnectionClosed("the worker closed the connection")
        self.transport.write(request)

    async def headers(self) -> None:
        while not self.headers_done:
            await self._wait()

    async def next_body(self) -> bytes:
        while not self.body:
            if self.complete:
                return b""
            await self._wait()
        chunk = b"".join(self.body) if len(self.body) > 1 else self.body[0]
        self.body.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return chunk

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and self.error is None and self.transport is not None


class Upstream:
    def __init__(self, limit: int, timeout: float, headers: dict[str, str] | None = None) -> None:
        self.timeout = timeout
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()).encode("latin-1")
        self._slots = asyncio.Semaphore(limit) if limit > 0 else None
        self._idle: dict[tuple[str, int, bool], deque[_Conn]] = {}
        self._split: dict[str, tuple[str, int, bool, bytes]] = {}
        self._open: set[_Conn] = set()

    def _target(self, url: str) -> tuple[str, int, bool, bytes]:
        """(host, port, TLS, the request's head up to its Content-Length) of ``url``."""
        target = self._split.get(url)
        if target is None:
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{url!r}: a worker's URL is http(s)://HOST:PORT")
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            host, tls = parts.hostname, parts.scheme == "https"
            port = parts.port or (443 if tls else 80)
            target = host, port, tls, b"POST " + path.encode() + b" HTTP/1.1\r\nHost: " + \
                f"{host}:{port}".encode() + b"\r\nContent-Type: application/json\r\n" + self.extra
            if len(self._split) < 4096:
                self._split[url] = target
        return target

    async def _connect(self, host: str, port: int, tls: bool, idle: deque[_Conn]) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(lambda: _Conn(idle), host, port, ssl=True if tls else None)
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {host}:{port}: {exc}") from exc
        return conn

    @asynccontextmanager
    async def post(self, url: str, body: bytes) -> AsyncIterator[Response]:
        """POST ``body`` (JSON) to ``url``; the answer once its headers came (read its body inside)."""
        host, port, tls, head = self._target(url)
        if self._slots is not None:
            await self._slots.acquire()
        conn: _Conn | None = None
        timer = None
        try:
            idle = self._idle.get((host, port, tls))
            if idle is None:
                idle = self._idle[(host, port, tls)] = deque()
            request = head + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            deadline = asyncio.get_running_loop().time() + self.timeout
            while True:
                reused = bool(idle)
                conn = idle.pop() if idle else await self._connect(host, port, tls, idle)
                self._open.add(conn)
                timer = asyncio.get_running_loop().call_at(deadline, conn.time_out, self.timeout)
                try:
                    conn.send(request)
                    await conn.headers()
                    break
                except ConnectionClosed:
                    if not reused or conn.headers_done:
                        raise
                    # a kept-alive connection the worker closed while it was idle (its keep-alive timeout
                    # raced this request): nothing of the answer came, so the worker never took the request;
                    # send it once more on a new connection, as HTTP clients do with pooled connections
                    timer.cancel()
                    self._open.discard(conn)
                    conn.close()
            yield Response(conn)
        finally:
            if timer is not None:
                timer.cancel()
            if conn is not None:
                self._open.discard(conn)
                if conn.reusable() and not conn.body:
                    conn.pool.append(conn)
                else:
                    conn.close()
            if self._slots is not None:
                self._slots.release()

    async def close(self) -> None:
        """Close every connection, idle or in use."""
        for idle in self._idle.values():
            for conn in list(idle):
                conn.close()
            idle.clear()
        for conn in list(self._open):
            conn.close()
        self._open.clear()
