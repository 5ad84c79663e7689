"""Bearer tokens on kvrelay's HTTP servers (router, reference engine) and on their clients.

With keys on, every route but the open ones (``/healthz`` and ``/readyz``: liveness and readiness say
nothing about requests, and supervisors and load balancers probe them without credentials) needs
``Authorization: Bearer <DIR/token>``; anything else is answered 401 with an OpenAI-style JSON error
and counted under plane ``http``.  The official ``openai`` client sends the token as its ``api_key``.

Owns: the middleware and the header clients send.  Must not touch: the routes.
"""

from __future__ import annotations

from typing import Awaitable, Callable

from aiohttp import web

from kvrelay.security.config import current
from kvrelay.security.keyfiles import Keys
from kvrelay.security.metrics import refused

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def bearer_middleware(keys: Keys, open_paths: frozenset[str] = OPEN_PATHS):  # -> aiohttp middleware
    """An aiohttp middleware that answers 401 unless the request carries ``keys``' bearer token."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in open_paths or keys.check_token(request.headers.get("Authorization")):
            return await handler(request)
        why = "no bearer token" if "Authorization" not in request.headers else "a wrong bearer token"
        refused("http", why, request.remote or "")
        return web.json_response(
            {"error": {"message": f"{why}: send 'Authorization: Bearer <token>' with the token in the key "
                                  f"directory's 'token' file (the openai client's api_key)",
                       "type": "authentication_error", "code": 401}},
            status=401, headers={"WWW-Authenticate": 'Bearer realm="kvrelay"'})

    return check


def protect(app: web.Application, keys: Keys | None = None) -> None:
    """Require the bearer token on ``app`` when keys are on (``keys``, else this process's); call before it starts."""
    keys = keys or current()
    if keys is not None:
        app.middlewares.append(bearer_middleware(keys))


def auth_headers(keys: Keys | None = None) -> dict[str, str]:
    """The header an HTTP client of a kvrelay server sends: ``{"Authorization": "Bearer ..."}`` with keys on."""
    keys = keys or current()
    return {"Authorization": f"Bearer {keys.token}"} if keys is not None else {}
