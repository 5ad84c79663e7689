"""Running an aiohttp app as a kvrelay process: bind, announce readiness, serve until SIGTERM/SIGINT.

Owns: what an HTTP process puts in its ready file (``{port, pid, url}``; the convention itself is
kvrelay/readyfile.py) (the loopback-unless-authenticated rule, check_loopback, lives in kvrelay/security).  Must not touch: the app's routes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from aiohttp import web

from kvrelay.readyfile import write_ready_file
from kvrelay.security import LOOPBACK, check_loopback

__all__ = ["LOOPBACK", "check_loopback", "serve_until_signal"]


async def serve_until_signal(app: web.Application, host: str, port: int, ready_file: str, name: str,
                             log: logging.Logger, reuse_port: bool = False, extra: dict | None = None) -> None:
    """Serve ``app`` on host:port (0 picks a free port) until SIGTERM or SIGINT, then clean up (``reuse_port``:
    SO_REUSEPORT, for several processes on one port)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
    await site.start()
    port = runner.addresses[0][1]  # the bound (host, port, ...): the port picked when 0 was asked for
    log.info("%s serving http://%s:%d", name, host, port)
    if ready_file:
        write_ready_file(ready_file, {"port": port, "pid": os.getpid(), "url": f"http://{host}:{port}", **(extra or {})})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
