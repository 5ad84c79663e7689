"""`kvrelay router`: an OpenAI-compatible proxy that runs each request as a prefill leg and a decode leg.

For each /v1/completions or /v1/chat/completions request it picks a prefill worker and a decode worker
from their pools and sends both legs at once, under one request id.  The prefill engine publishes the
prompt's KV layer by layer into the store; the decode leg carries ``kv_transfer_params:
{"do_remote_prefill": true}``, so the decode worker derives the chunk addresses from the prompt itself
and pulls each layer as soon as it is committed, while the prefill is still computing later layers.
Chunks are content-addressed, so a failed prefill leg is simply sent again to another prefill worker
under the same request id, and the waiting decode never notices; with no prefill worker left the decode
recomputes the prompt once its pull deadline passes (or at once, when no prefill worker was healthy to
begin with).  A decode worker that fails before answering is marked down and the request goes to
another.  A background task re-checks /healthz of every worker.

Owns: request forwarding and failover.  Must not touch: engines or the store.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import uuid

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, CONTENT_TYPE_LATEST

from kvrelay.router.pool import POLICIES, NoWorkerError, Pool
from kvrelay.serving import check_loopback, serve_until_signal

RELAY_ID = "kvrelay_request_id"  # = kvrelay.engines.vllm.meta.RELAY_ID (not imported: no engine code here)

log = logging.getLogger("kvrelay.router")


class Router:
    def __init__(self, prefill: Pool, decode: Pool, health_interval: float = 2.0, timeout: float = 600.0) -> None:
        self.prefill, self.decode = prefill, decode
        self.health_interval = health_interval
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.session: aiohttp.ClientSession | None = None
        self.registry = CollectorRegistry()
        self.requests = Counter("kvrelay_router_requests", "Requests by outcome", ["outcome"], registry=self.registry)
        self.failovers = Counter("kvrelay_router_failovers", "Legs retried on another worker", ["role"],
                                 registry=self.registry)
        self.prefill_latency = Histogram("kvrelay_router_prefill_seconds", "Prefill leg latency",
                                         registry=self.registry)
        self.app = web.Application()
        self.app.router.add_post("/v1/completions", self.handle)
        self.app.router.add_post("/v1/chat/completions", self.handle)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/readyz", self.readyz)
        self.app.router.add_get("/metrics", self.metrics)
        self.app.on_startup.append(self._start)
        self.app.on_cleanup.append(self._stop)

    @property
    def http(self) -> aiohttp.ClientSession:
        """The session to the workers; it exists while the app runs (from its startup to its cleanup)."""
        if self.session is None:
            raise RuntimeError("the router's HTTP session is not open: the app is not running")
        return self.session

    async def _start(self, app: web.Application) -> None:
        self.session = aiohttp.ClientSession(timeout=self.timeout)
        await asyncio.gather(self.prefill.check(self.session), self.decode.check(self.session))
        self._health_task = asyncio.create_task(self._health_loop())

    async def _stop(self, app: web.Application) -> None:
        self._health_task.cancel()
        if self.session is not None:
            await self.session.close()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            await asyncio.gather(self.prefill.check(self.http), self.decode.check(self.http))

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        ready = bool(self.decode.healthy())
        body = {"ready": ready, "prefill": [w.url for w in self.prefill.healthy()],
                "decode": [w.url for w in self.decode.healthy()]}
        return web.json_response(body, status=200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, request: web.Request) -> web.Response:
        try:
            worker = self.decode.pick()
            async with self.http.get(f"{worker.url}/v1/models") as r:
                return web.Response(body=await r.read(), status=r.status, content_type="application/json")
        except (NoWorkerError, aiohttp.ClientError) as exc:
            return _error(503, str(exc))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _error(400, f"the request body is not valid JSON: {exc}")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object")
        if not self.prefill.healthy():
            log.warning("no healthy prefill worker: the decode worker computes the whole request")
            return await self._decode_leg(request, body)
        rid = str(body.get("request_id") or f"kvrelay-{uuid.uuid4().hex}")
        body = {**body, "request_id": rid}
        prefill = asyncio.create_task(self._prefill_leg(request.path, body))
        try:
            # kvrelay_request_id: vLLM names each leg's request itself; the shared id lets a prefill's abort
            # in the store reach the decode's waiting pulls there too (the reference engines use request_id)
            return await self._decode_leg(request, {**body, "kv_transfer_params": {"do_remote_prefill": True,
                                                                                   RELAY_ID: rid}})
        finally:
            if not prefill.done():  # the decode is answered: the prefill leg has no one left to serve
                prefill.cancel()
            try:
                await prefill
            except asyncio.CancelledError:
                pass

    async def _prefill_leg(self, path: str, body: dict) -> bool:
        """Run the prefill leg, failing over to other prefill workers; True once one published."""
        leg = {**body, "stream": False, "max_tokens": 1,
               "kv_transfer_params": {"do_remote_decode": True, RELAY_ID: body["request_id"]}}
        leg.pop("max_completion_tokens", None)
        tried: set[str] = set()
        while True:
            try:
                worker = self.prefill.pick(tried)
            except NoWorkerError as exc:
                log.warning("prefill leg of %s failed everywhere; the decode recomputes after its deadline: %s",
                            body["request_id"], exc)
                return False
            tried.add(worker.url)
            worker.in_flight += 1
            try:
                with self.prefill_latency.time():
                    async with self.http.post(worker.url + path, json=leg) as r:
                        data = await r.json(content_type=None)
                if r.status >= 500:
                    raise aiohttp.ClientError(f"HTTP {r.status}: {data}")
                if r.status >= 400:  # the request itself is bad: the decode leg says why to the client
                    return False
                if not data.get("kv_transfer_params"):  # e.g. the store was full: nothing was published,
                    log.warning("prefill of %s published nothing (the decode recomputes after its deadline)",
                                body["request_id"])  # and another prefill worker would meet the same store
                    return False
                return True
            except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
                self.prefill.mark_failed(worker, f"{type(exc).__name__}: {exc}")
                self.failovers.labels("prefill").inc()
                log.warning("prefill worker %s failed (%s); trying another", worker.url, exc)
            finally:
                worker.in_flight -= 1

    async def _decode_leg(self, request: web.Request, body: dict) -> web.StreamResponse:
        tried: set[str] = set()
        while True:
            try:
                worker = self.decode.pick(tried)
            except NoWorkerError as exc:
                self.requests.labels("no_decode_worker").inc()
                return _error(503, str(exc))
            tried.add(worker.url)
            worker.in_flight += 1
            resp: web.StreamResponse | None = None
            try:
                async with self.http.post(worker.url + request.path, json=body) as r:
                    resp = web.StreamResponse(status=r.status, headers={
                        "Content-Type": r.headers.get("Content-Type", "application/json")})
                    await resp.prepare(request)
                    async for data in r.content.iter_any():
                        await resp.write(data)
                    await resp.write_eof()
                    self.requests.labels("ok" if r.status < 400 else f"http_{r.status}").inc()
                    return resp
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                self.decode.mark_failed(worker, f"{type(exc).__name__}: {exc}")
                if resp is not None:  # bytes already went to the client: cannot retry
                    self.requests.labels("decode_failed_midstream").inc()
                    return resp
                self.failovers.labels("decode").inc()
                log.warning("decode worker %s failed (%s); trying another", worker.url, exc)
            finally:
                worker.in_flight -= 1


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "code": status}}, status=status)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvrelay router", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--prefill", action="append", default=[], metavar="URL", help="a prefill worker (repeatable)")
    p.add_argument("--decode", action="append", default=[], metavar="URL", help="a decode worker (repeatable)")
    p.add_argument("--policy", choices=POLICIES, default="least_loaded")
    p.add_argument("--health-interval", type=float, default=2.0)
    p.add_argument("--ready-file", default="")
    p.add_argument("--log-level", default=os.environ.get("KVRELAY_LOG_LEVEL", "INFO"))
    return p


async def _serve(args: argparse.Namespace) -> None:
    router = Router(Pool("prefill", args.prefill, args.policy), Pool("decode", args.decode, args.policy),
                    args.health_interval)
    await serve_until_signal(router.app, args.host, args.port, args.ready_file,
                             f"kvrelay router ({len(args.prefill)} prefill, {len(args.decode)} decode)", log)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        check_loopback(args.host, "router")
    except ValueError as exc:
        print(f"kvrelay router: {exc}", file=sys.stderr)
        return 2
    if not args.decode:
        print("kvrelay router: at least one --decode URL is needed", file=sys.stderr)
        return 2
    asyncio.run(_serve(args))
    return 0
