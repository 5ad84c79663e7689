"""Running an aiohttp app as a kvrelay process: bind, announce readiness, serve until SIGTERM/SIGINT.

Owns: what an HTTP process puts in its ready file (``{port, pid, url}``; the convention itself is
kvrelay/readyfile.py).  Must not touch: the app's routes, or which address it may bind (the
loopback-unless-authenticated rule, `kvrelay.security.check_loopback`: its callers check before they serve).
Base layer: imports kvrelay.readyfile only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Awaitable, Callable

from aiohttp import web

from kvrelay.readyfile import write_ready_file

__all__ = ["serve_until_signal", "start_serving"]


async def start_serving(app: web.Application, host: str, port: int, reuse_port: bool = False) -> web.AppRunner:
    """Start serving ``app`` on host:port as every kvrelay HTTP process does, and return its runner (the bound
    port is ``runner.addresses[0][1]``; ``runner.cleanup()`` stops it).  A handler whose client disconnects
    is cancelled (``asyncio.CancelledError`` at its current await), so the work it started ends with it: the
    router cancels both legs, an engine aborts the request (issue 26).  Tests serve through this too."""
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
    await site.start()
    return runner


async def serve_until_signal(app: web.Application, host: str, port: int, ready_file: str, name: str,
                             log: logging.Logger, reuse_port: bool = False, extra: dict | None = None,
                             bound: Callable[[int], Awaitable[Callable[[], Awaitable[None]] | None]] | None = None
                             ) -> None:
    """Serve ``app`` on host:port (0 picks a free port) until SIGTERM or SIGINT, then clean up (``reuse_port``:
    SO_REUSEPORT, for several processes on one port), started by `start_serving`.  ``bound(port)``, if given,
    runs once the port is bound and before the ready file is written (e.g. registering in etcd); what it
    returns, if anything, is awaited when the signal comes, before the server stops serving."""
    runner = await start_serving(app, host, port, reuse_port)
    port = runner.addresses[0][1]  # the bound (host, port, ...): the port picked when 0 was asked for
    log.info("%s serving http://%s:%d", name, host, port)
    try:
        unbind = await bound(port) if bound is not None else None
    except BaseException:
        await runner.cleanup()
        raise
    if ready_file:
        write_ready_file(ready_file, {"port": port, "pid": os.getpid(), "url": f"http://{host}:{port}", **(extra or {})})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        try:
            if unbind is not None:
                await unbind()
        finally:
            await runner.cleanup()
