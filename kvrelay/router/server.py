"""`kvrelay router`: an OpenAI-compatible proxy that runs each request as a prefill leg and a decode leg.

For each /v1/completions or /v1/chat/completions request it picks a prefill worker and a decode worker
from their pools and sends both legs at once, under one request id.  The prefill engine publishes the
prompt's KV layer by layer into the store; the decode leg carries ``kv_transfer_params:
{"do_remote_prefill": true}``, so the decode worker derives the chunk addresses from the prompt itself
and pulls each layer as soon as it is committed, while the prefill is still computing later layers.
Each leg is retried with jittered backoff (legs.py, retry.py); each worker has a circuit breaker
(pool.py, breaker.py).  With no prefill worker in service, or with the store down (``--store``: its
breaker open, store.py), the request goes to a decode worker alone, which computes it at once.  A
background loop re-checks every worker's health every ``--health-interval`` seconds, and those out of
service every ``--probe-interval``, so a worker that answers again is back within that much.

Owns: the app (routes, /readyz, /metrics), P/D or decode alone, the health loop and the command line.
Must not touch: engines or the store.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import sys
import urllib.parse
import uuid
from pathlib import Path
from typing import Callable

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvrelay import security
from kvrelay.security import params as signed_params
from kvrelay.security.http import auth_headers, protect
from kvrelay.router.cacheview import CacheView, EventSource, parse_events
from kvrelay.router.legs import RELAY_ID, Legs
from kvrelay.router.metrics import RouterMetrics
from kvrelay.router.policy import POLICIES, STORE, Decision, Disagg, Policy
from kvrelay.router.pool import NoWorkerError, Pool, Worker
from kvrelay.router.relay import ClientGone, error_response
from kvrelay.router.retry import RetryPolicy
from kvrelay.router.store import StoreWatch
from kvrelay.router.workers import run_workers
from kvrelay.serving import check_loopback, serve_until_signal

log = logging.getLogger("kvrelay.router")


class Router:
    def __init__(self, prefill: Pool, decode: Pool, health_interval: float = 2.0, timeout: float = 600.0, *,
                 retry: RetryPolicy | None = None, probe_interval: float = 0.2,
                 store: StoreWatch | None = None, prefill_connections: int = 1000, decode_connections: int = 1000,
                 prefill_drain: float = 30.0, policy: Policy | None = None,
                 cache: CacheView | None = None) -> None:
        if health_interval <= 0 or probe_interval <= 0:
            raise ValueError(f"--health-interval {health_interval} and --probe-interval {probe_interval} must be "
                             f"positive (seconds)")
        for flag, n in (("--prefill-connections", prefill_connections), ("--decode-connections", decode_connections)):
            if n < 0:
                raise ValueError(f"{flag} {n}: must be 0 (no limit) or a positive number of connections")
        if not (math.isfinite(prefill_drain) and prefill_drain >= 0):
            raise ValueError(f"--prefill-drain {prefill_drain:g}: must be 0 (cancel at once) or a positive number of "
                             f"seconds")
        self.prefill, self.decode, self.store = prefill, decode, store
        self.health_interval, self.probe_interval = health_interval, probe_interval
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        # one session per leg, each with its own connection limit (aiohttp's default of 100 shared by both
        # legs capped the router at 100 streams), and one for the health probes
        self.limits = {"prefill": prefill_connections, "decode": decode_connections, "health": 100}
        self.sessions: dict[str, aiohttp.ClientSession] = {}
        self.prefill_drain = prefill_drain
        self._draining: set[asyncio.Task] = set()
        self.policy = policy or Policy(prefill.policy, cache.index if cache is not None else None)
        if cache is None and self.policy.needs_tokens:  # e.g. --decode-only-below alone: tokens, no events
            cache = CacheView([])
        self.cache = cache
        if cache is not None:
            self.policy.followed = {s.name for s in cache.sources}
        self.metrics = RouterMetrics((prefill, decode), store, self.policy)
        self.legs = Legs(prefill, decode, retry or RetryPolicy(), self.metrics, self._session)
        self._wake = asyncio.Event()  # a breaker opened: start probing at the short interval
        prefill.on_open = decode.on_open = self._wake.set
        self.app = web.Application()
        self.keys = security.current()
        protect(self.app, self.keys)  # with keys: Authorization: Bearer <token> on all but /healthz, /readyz
        self.app.router.add_post("/v1/completions", self.handle)
        self.app.router.add_post("/v1/chat/completions", self.handle)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/readyz", self.readyz)
        self.app.router.add_get("/metrics", self.metrics_page)
        self.app.on_startup.append(self._start)
        self.app.on_cleanup.append(self._stop)

    def _session(self, role: str) -> aiohttp.ClientSession:
        """The session of one leg ("prefill", "decode") or of the probes ("health"); they exist while the app
        runs (from its startup to its cleanup)."""
        session = self.sessions.get(role)
        if session is None:
            raise RuntimeError("the router's HTTP sessions are not open: the app is not running")
        return session

    @property
    def http(self) -> aiohttp.ClientSession:
        return self._session("health")

    async def _start(self, app: web.Application) -> None:
        self.sessions = {role: aiohttp.ClientSession(timeout=self.timeout, connector=aiohttp.TCPConnector(
            limit=limit, limit_per_host=0), headers=auth_headers(self.keys)) for role, limit in self.limits.items()}
        await self._check(only_down=False)
        if self.store is not None:
            await self.store.check()
            self.store.start()
        self._health_task = asyncio.create_task(self._health_loop())
        if self.cache is not None:
            self.cache.start()

    async def _stop(self, app: web.Application) -> None:
        self._health_task.cancel()
        for task in list(self._draining):
            task.cancel()
        await asyncio.gather(*self._draining, return_exceptions=True)
        if self.store is not None:
            await self.store.stop()
        if self.cache is not None:
            await self.cache.stop()
        for session in self.sessions.values():
            await session.close()
        self.sessions = {}

    async def _check(self, only_down: bool) -> None:
        await asyncio.gather(self.prefill.check(self.http, only_down=only_down),
                             self.decode.check(self.http, only_down=only_down))

    async def _health_loop(self) -> None:
        """Every worker every health interval; while any is out of service, those every probe interval."""
        loop = asyncio.get_running_loop()
        next_full, next_probe = loop.time() + self.health_interval, float("inf")
        while True:
            self._wake.clear()
            if next_probe == float("inf") and (self.prefill.down() or self.decode.down()):
                next_probe = loop.time() + self.probe_interval
            try:  # woken early when a breaker opens: its probe is then due a probe interval later
                await asyncio.wait_for(self._wake.wait(), max(0.0, min(next_full, next_probe) - loop.time()))
                continue
            except asyncio.TimeoutError:
                pass
            full = loop.time() >= next_full
            await self._check(only_down=not full)
            next_probe = float("inf")
            if full:
                next_full = loop.time() + self.health_interval

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        ready = bool(self.decode.healthy())
        breakers = {p.role: [{"url": w.url, "state": w.breaker.state.value, "consecutive_failures":
                              w.breaker.consecutive, "opened": w.breaker.opened, "last_error": w.last_error}
                             for w in p.workers] for p in (self.prefill, self.decode)}
        body = {"ready": ready, "prefill": [w.url for w in self.prefill.healthy()],
                "decode": [w.url for w in self.decode.healthy()], "breakers": breakers,
                "store": self.store.state() if self.store is not None else None, "pid": os.getpid()}
        return web.json_response(body, status=200 if ready else 503)

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, request: web.Request) -> web.Response:
        try:
            worker = self.decode.pick()
            async with self.http.get(f"{worker.url}/v1/models") as r:
                return web.Response(body=await r.read(), status=r.status, content_type="application/json")
        except (NoWorkerError, aiohttp.ClientError) as exc:
            return error_response(503, str(exc))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return error_response(400, f"the request body is not valid JSON: {exc}")
        if not isinstance(body, dict):
            return error_response(400, "the request body must be a JSON object")
        if self.keys is not None:  # only the router sets kv_transfer_params (signed: kvrelay/security/params.py)
            body = signed_params.strip(body)
        try:
            return await self._route(request, body)
        except ClientGone as gone:
            self.metrics.requests.labels("client_gone").inc()
            return gone.response

    async def _route(self, request: web.Request, body: dict) -> web.StreamResponse:
        if self.store is not None and not self.store.up:
            self.metrics.routes.labels("decode_only_store_down").inc()
            return await self.legs.decode(request, body)
        if not self.prefill.healthy():
            log.warning("no prefill worker in service: the decode worker computes the whole request")
            self.metrics.routes.labels("decode_only_no_prefill").inc()
            return await self.legs.decode(request, body)
        tokens = self.cache.tokens(request.path, body) if self.cache is not None and self.policy.needs_tokens \
            else None
        salt = body.get("cache_salt")
        salt = salt if isinstance(salt, str) else ""  # another type: the engines refuse the request, naming it
        try:
            d = self.policy.decide(self.prefill, self.decode, tokens, store_up=self.store is None or self.store.up,
                                   salt=salt)
        except NoWorkerError:  # no decode worker in service: the decode leg answers why
            return await self.legs.decode(request, body)
        self.metrics.routes.labels(d.reason).inc()
        self.policy.routed(d, tokens, salt)
        d.decode.load_tokens += d.prompt_tokens
        try:
            return await self._legs(request, body, d)
        finally:
            d.decode.load_tokens -= d.prompt_tokens

    async def _legs(self, request: web.Request, body: dict, d: Decision) -> web.StreamResponse:
        if not d.pull:  # the decode worker computes the prompt itself
            return await self.legs.decode(request, body, first=d.decode)
        rid = str(body.get("request_id") or f"kvrelay-{uuid.uuid4().hex}")
        body = {**body, "request_id": rid}
        # kvrelay_request_id: vLLM names each leg's request itself; the shared id lets a prefill's abort
        # in the store reach the decode's waiting pulls there too (the reference engines use request_id)
        params = {"do_remote_prefill": True, RELAY_ID: rid}
        pull = {**body, "kv_transfer_params": signed_params.sign(self.keys, params, rid) if self.keys else params}
        if d.prefill is None:  # the store holds the whole prompt: the decode pulls it, no prefill leg
            return await self.legs.decode(request, pull, first=d.decode)
        stop = asyncio.Event()
        prefill = self._prefill_leg(request.path, body, stop, d.prefill, d.prefill_tokens)
        try:
            return await self.legs.decode(request, pull, first=d.decode)
        finally:
            if not prefill.done():  # the decode is answered: the prefill leg has no one left to serve
                stop.set()
                self._drain(prefill)

    def _prefill_leg(self, path: str, body: dict, stop: asyncio.Event, worker: Worker, load: int) -> asyncio.Task:
        """The prefill leg as a task.  Until the task starts, ``worker`` counts it as in flight (and its tokens
        as queued): a burst of requests picked before any of their tasks ran must not all pick one worker."""
        worker.load_tokens += load
        worker.in_flight += 1
        reserved = True

        def release() -> None:
            nonlocal reserved
            if reserved:
                reserved = False
                worker.in_flight -= 1

        async def leg() -> bool:
            release()  # the leg counts itself from its first attempt on
            return await self.legs.prefill(path, body, stop, first=worker)
        task = asyncio.create_task(leg())

        def done(_: asyncio.Task) -> None:
            release()  # cancelled before it started
            worker.load_tokens -= load
        task.add_done_callback(done)
        return task

    def _drain(self, task: asyncio.Task) -> None:
        """Let a prefill leg whose decode was answered finish its attempt in the background, so that its
        connection goes back to the pool; cancelled (closing the connection) after ``prefill_drain`` seconds."""
        if self.prefill_drain <= 0:
            task.cancel()
        self._draining.add(task)
        timer = asyncio.get_running_loop().call_later(self.prefill_drain, task.cancel)

        def done(t: asyncio.Task) -> None:
            timer.cancel()
            self._draining.discard(t)
            self.metrics.prefill_drained.labels("cancelled" if t.cancelled() else "finished").inc()
            if not t.cancelled() and t.exception() is not None:
                log.error("a drained prefill leg failed: %s", t.exception())
        task.add_done_callback(done)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvrelay router", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--prefill", action="append", default=[], metavar="URL", help="a prefill worker (repeatable)")
    p.add_argument("--decode", action="append", default=[], metavar="URL", help="a decode worker (repeatable)")
    p.add_argument("--policy", choices=POLICIES, default="least_loaded")
    p.add_argument("--store", default="", metavar="ADDR",
                   help="the store's control address (tcp://127.0.0.1:PORT, as given to the engines): while it does "
                        "not answer pings, requests go to a decode worker alone")
    p.add_argument("--health-interval", type=float, default=2.0, help="seconds between health checks of every worker")
    p.add_argument("--probe-interval", type=float, default=0.2,
                   help="seconds between probes of a worker (or the store) out of service")
    p.add_argument("--retries", type=int, default=5, help="attempts of a failed leg after the first")
    p.add_argument("--retry-backoff", type=float, default=0.05,
                   help="seconds: the first retry waits a random time below this; each next one below twice as much")
    p.add_argument("--retry-backoff-max", type=float, default=1.0, help="seconds: the longest wait between retries")
    p.add_argument("--breaker-failures", type=int, default=10,
                   help="consecutive failed requests that take a worker out of service (a refused or reset "
                        "connection does at once)")
    p.add_argument("--prefill-connections", type=int, default=1000,
                   help="most open connections to the prefill workers together (0: no limit)")
    p.add_argument("--decode-connections", type=int, default=1000,
                   help="most open connections to the decode workers together, hence most streams at once (0: no "
                        "limit)")
    p.add_argument("--prefill-drain", type=float, default=30.0,
                   help="seconds a prefill leg may run on after its decode was answered, so that its connection is "
                        "kept; then it is cancelled (0: at once)")
    p.add_argument("--events", action="append", default=[], metavar="NAME=PUB[,REPLAY]",
                   help="follow the KV events of a worker (NAME: its --prefill/--decode URL) or of the store "
                        "(NAME: store) at the ZMQ publisher PUB and its replay socket REPLAY (repeatable); "
                        "cache_aware routing and the decode-only rules read them")
    p.add_argument("--tokenizer", default="", metavar="DIR",
                   help="the checkpoint whose tokenizer.json the engines use, to hash text prompts as they do "
                        "(default: byte-level, the reference engine's without one; token-id prompts need none)")
    p.add_argument("--overlap-weight", type=float, default=1.0,
                   help="cache_aware: weight of the prompt tokens left to compute against queued tokens")
    p.add_argument("--decode-only-below", type=int, default=0, metavar="TOKENS",
                   help="prompts shorter than this go to a decode worker alone (0: off)")
    p.add_argument("--decode-only-hit", type=float, default=0.8, metavar="FRACTION",
                   help="a prompt whose prefix a decode worker holds for at least this fraction (tier-weighted) "
                        "goes to it alone (above 1: off; needs --events of the decode workers)")
    p.add_argument("--store-skip", action="store_true",
                   help="no prefill leg when the store's events show it holds the whole prompt, under the request's "
                        "own cache_salt (the decode pulls it); off by default: the store may evict the prompt "
                        "between its event and the pull, and the decode then waits out its pull deadline")
    p.add_argument("--workers", type=int, default=1,
                   help="router processes sharing the port (SO_REUSEPORT), for more than one core; each keeps its "
                        "own pools, breakers, KV index and metrics")
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # a --workers child
    p.add_argument("--ready-file", default="")
    p.add_argument("--log-level", default=os.environ.get("KVRELAY_LOG_LEVEL", "INFO"))
    security.add_argument(p)
    return p


def build_router(args: argparse.Namespace) -> Router:
    """The router the flags describe; ValueError names a bad flag."""
    check_loopback(args.host, "router")
    if not args.decode:
        raise ValueError("at least one --decode URL is needed")
    store = (StoreWatch(args.store, interval=args.health_interval, probe_interval=args.probe_interval)
             if args.store else None)
    names = {u.rstrip("/") for u in args.prefill + args.decode} | {STORE}
    sources: list[EventSource] = [parse_events(spec, names) for spec in args.events]
    if args.tokenizer and not Path(args.tokenizer).is_dir():
        raise ValueError(f"--tokenizer {args.tokenizer!r} is not a directory (give the engines' checkpoint)")
    cache = CacheView(sources, args.tokenizer or None) if sources or args.tokenizer or args.policy == "cache_aware" \
        else None
    if args.policy == "cache_aware" and not sources:
        log.warning("--policy cache_aware without --events: no cache is known, it routes by load alone")
    disagg = Disagg(args.decode_only_below, args.decode_only_hit, args.store_skip)
    policy = Policy(args.policy, cache.index if cache is not None else None, disagg, args.overlap_weight)
    return Router(Pool("prefill", args.prefill, args.policy, args.breaker_failures),
                  Pool("decode", args.decode, args.policy, args.breaker_failures), args.health_interval,
                  retry=RetryPolicy(args.retries, args.retry_backoff, args.retry_backoff_max),
                  probe_interval=args.probe_interval, store=store, prefill_connections=args.prefill_connections,
                  decode_connections=args.decode_connections, prefill_drain=args.prefill_drain, policy=policy,
                  cache=cache)


def _bad_address(address: str, schemes: tuple[str, ...]) -> str:
    """Why ``address`` is not SCHEME://HOST:PORT with one of ``schemes`` ("" if it is)."""
    try:
        parts = urllib.parse.urlsplit(address)
        port = parts.port
    except ValueError as exc:  # a port that is not a number, or out of range
        return str(exc)
    if parts.scheme not in schemes:
        return f"the scheme must be {' or '.join(s + '://' for s in schemes)}"
    if not parts.hostname:
        return "no host"
    if port is None:
        return "no port"
    if port == 0:
        return "port 0 is not a port to connect to"
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username is not None:
        return "nothing may follow host:port"
    return ""


def check_args(args: argparse.Namespace) -> None:
    """The flags checked before anything starts: ValueError naming the bad one (build_router checks the rest)."""
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is outside 0..65535 (0 picks a free port)")
    security.configure(args.keys)
    addresses: list[tuple[str, str, tuple[str, ...], str]] = [
        ("--prefill", u, ("http", "https"), "http://127.0.0.1:8100") for u in args.prefill]
    addresses += [("--decode", u, ("http", "https"), "http://127.0.0.1:8200") for u in args.decode]
    if args.store:
        addresses.append(("--store", args.store, ("tcp",), "tcp://127.0.0.1:5600 (the store's control address)"))
    for flag, address, schemes, example in addresses:
        if why := _bad_address(address, schemes):
            raise ValueError(f"{flag} {address!r}: {why}; give {schemes[0]}://HOST:PORT, e.g. {example}")
    if args.retries < 0:
        raise ValueError(f"--retries {args.retries}: must be 0 (no retry) or more")
    if args.breaker_failures < 1:
        raise ValueError(f"--breaker-failures {args.breaker_failures}: a worker needs at least 1 failure to go out "
                         f"of service")
    for flag, n in (("--prefill-connections", args.prefill_connections),
                    ("--decode-connections", args.decode_connections)):
        if n < 0:
            raise ValueError(f"{flag} {n}: must be 0 (no limit) or a positive number of connections")
    if not (math.isfinite(args.prefill_drain) and args.prefill_drain >= 0):
        raise ValueError(f"--prefill-drain {args.prefill_drain:g}: must be 0 (cancel at once) or a positive number "
                         f"of seconds")
    for flag, seconds in (("--retry-backoff", args.retry_backoff), ("--retry-backoff-max", args.retry_backoff_max),
                          ("--health-interval", args.health_interval), ("--probe-interval", args.probe_interval)):
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"{flag} {seconds:g}: must be a positive number of seconds")
    if args.retry_backoff_max < args.retry_backoff:
        raise ValueError(f"--retry-backoff {args.retry_backoff:g} is above --retry-backoff-max "
                         f"{args.retry_backoff_max:g}: the first wait's cap must be at most the longest wait")
    if not 1 <= args.workers <= 64:
        raise ValueError(f"--workers {args.workers}: give 1 to 64 router processes")
    if args.ready_file and not Path(args.ready_file).parent.is_dir():
        raise ValueError(f"--ready-file {args.ready_file!r}: the directory {str(Path(args.ready_file).parent)!r} "
                         f"does not exist")
    if not isinstance(logging.getLevelName(args.log_level.upper()), int):
        raise ValueError(f"--log-level {args.log_level!r}: choose DEBUG, INFO, WARNING or ERROR")


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when it is installed (about half the router's CPU per relayed request), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
        router = build_router(args)
    except ValueError as exc:
        print(f"kvrelay router: {exc}", file=sys.stderr)
        return 2
    if args.workers > 1:
        return run_workers(list(argv if argv is not None else sys.argv[1:]), args.host, args.port, args.workers,
                           args.ready_file)
    name = f"kvrelay router ({len(args.prefill)} prefill, {len(args.decode)} decode)"

    async def serve() -> None:
        try:
            await serve_until_signal(router.app, args.host, args.port, args.ready_file, name, log,
                                     reuse_port=args.reuse_port)
        except OSError:  # the app had started (its session, its probes) before the bind failed: close them
            await router.app.cleanup()
            raise

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve())
    except OSError as exc:  # the port is taken, or the ready file cannot be written
        print(f"kvrelay router: cannot serve on --host {args.host} --port {args.port}: {exc}", file=sys.stderr)
        return 2
    return 0
