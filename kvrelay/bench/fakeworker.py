"""A fixed-answer OpenAI-shaped worker, to measure the router's own cost (`kvrelay bench router`, capacity).

    python -m kvrelay.bench.fakeworker --ready-file F [--chunks 16] [--chunk-delay 0]

Not an engine and never presented as one: it answers every completion with ``--chunks`` SSE events (text
``t0 t1 ...``) and ``data: [DONE]``, or, for a non-streaming request (the router's prefill leg), a small
JSON body with ``kv_transfer_params``, as fast as it can (uvloop when installed).  The router benchmark
sets the throughput of the router beside that of these same workers served directly.

Owns: the fake answer.  Must not touch: the router.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

from aiohttp import web

from kvrelay.serving import serve_until_signal

log = logging.getLogger("kvrelay.bench.fakeworker")


def build_app(chunks: int, chunk_delay: float) -> web.Application:
    events = [b"data: " + json.dumps({"id": "cmpl-fake", "object": "text_completion", "model": "fake",
                                       "choices": [{"index": 0, "text": f"t{i} ", "finish_reason": None}]}).encode()
              + b"\n\n" for i in range(chunks)]
    prefill = json.dumps({"choices": [{"text": "t0 ", "token_ids": [0]}],
                          "kv_transfer_params": {"fake": True}}).encode()

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.Response(body=prefill, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for ev in events:
            await resp.write(ev)
            if chunk_delay:
                await asyncio.sleep(chunk_delay)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/healthz", healthz)
    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvrelay.bench.fakeworker")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--chunk-delay", type=float, default=0.0)
    p.add_argument("--ready-file", default="")
    args = p.parse_args(argv)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve_until_signal(build_app(args.chunks, args.chunk_delay), "127.0.0.1", args.port,
                                   args.ready_file, "fake worker", log))
    return 0


if __name__ == "__main__":
    sys.exit(main())
