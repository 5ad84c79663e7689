"""Relaying a worker's answer to the client so that a failure is either retried or reported, never hidden.

A non-streaming answer is read whole before anything is sent: a worker that dies while writing it costs a
retry (or, with none left, a clean 502), never a truncated body.  A streaming (SSE) answer is relayed whole
events at a time, and the client's response starts with the first complete event: a worker that dies
before it sends one can still be retried.  One that dies after cuts the stream, and then the client gets a
last event ``data: {"error": {...}}`` and ``data: [DONE]`` (vLLM's form of a mid-stream error; the
official ``openai`` client raises ``APIError`` on it) instead of an answer that just stops.

Owns: `relay`, the error bodies and events, and which upstream errors mean the worker's process is gone.
Must not touch: choosing or retrying workers (legs.py).
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from kvrelay.router.upstream import ConnectFailed, ConnectionClosed, Response, UpstreamError

UPSTREAM_ERRORS = (UpstreamError, asyncio.TimeoutError)
# a refused connect, a connection closed or reset, a body cut short: the worker's process is gone
DEAD_PROCESS = (ConnectFailed, ConnectionClosed)


class LegFailure(Exception):
    """A worker failed before anything reached the client: the leg may be retried elsewhere.  ``response``:
    the worker's own error answer (an HTTP 5xx), returned to the client if no retry succeeds."""

    def __init__(self, message: str, fatal: bool, response: web.Response | None = None) -> None:
        super().__init__(message)
        self.fatal, self.response = fatal, response


class ClientGone(Exception):
    """The client closed its connection while its answer was being relayed."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("the client disconnected")
        self.response = response


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "kvrelay_router_error", "code": status}},
                             status=status)


def error_event(message: str, status: int = 502) -> bytes:
    err = {"error": {"message": message, "type": "upstream_error", "code": status}}
    return f"data: {json.dumps(err)}\n\n".encode() + b"data: [DONE]\n\n"


async def relay(request: web.Request, r: Response, worker: str) -> tuple[web.StreamResponse, str]:
    """Relay the worker's (non-5xx) answer ``r``: (the client's response, "" or why the stream was cut).
    Raises LegFailure if the worker failed before anything was sent, ClientGone if the client left."""
    ctype = r.content_type or "application/json"
    if not ctype.startswith("text/event-stream"):
        try:
            data = await r.read()
        except UPSTREAM_ERRORS as exc:
            raise LegFailure(describe(exc), isinstance(exc, DEAD_PROCESS)) from exc
        return web.Response(body=data, status=r.status, headers={"Content-Type": ctype}), ""
    resp: web.StreamResponse | None = None
    pending = b""
    while True:
        try:
            chunk = await r.readany()
        except UPSTREAM_ERRORS as exc:
            if resp is None:  # nothing sent: retry
                raise LegFailure(describe(exc), isinstance(exc, DEAD_PROCESS)) from exc
            why = describe(exc)  # a partial event in ``pending`` is dropped: the client sees whole events
            await _send(resp, error_event(f"decode worker {worker} failed mid-stream ({why}); the answer is "
                                          f"incomplete"))
            await _end(resp)
            return resp, why
        if not chunk:
            break
        pending += chunk
        cut = _events_end(pending)
        if cut:
            if resp is None:
                resp = await _start(request, r.status, ctype)
            await _send(resp, pending[:cut])
            pending = pending[cut:]
    if resp is None:
        resp = await _start(request, r.status, ctype)
    if pending:
        await _send(resp, pending)
    await _end(resp)
    return resp, ""


def _events_end(buf: bytes) -> int:
    """The length of the complete SSE events at the head of ``buf`` (0: none complete yet)."""
    ends = [i + len(sep) for sep in (b"\n\n", b"\r\n\r\n") if (i := buf.rfind(sep)) >= 0]
    return max(ends, default=0)


async def _start(request: web.Request, status: int, ctype: str) -> web.StreamResponse:
    resp = web.StreamResponse(status=status, headers={"Content-Type": ctype})
    try:
        await resp.prepare(request)
    except ConnectionResetError as exc:
        raise ClientGone(resp) from exc
    return resp


async def _send(resp: web.StreamResponse, data: bytes) -> None:
    try:
        await resp.write(data)
    except ConnectionResetError as exc:
        raise ClientGone(resp) from exc


async def _end(resp: web.StreamResponse) -> None:
    try:
        await resp.write_eof()
    except ConnectionResetError as exc:
        raise ClientGone(resp) from exc
