"""The `kvrelay router` app: an OpenAI-compatible proxy that runs each request as a prefill leg and a decode leg.

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

Owns: the app (routes, /readyz, /metrics), P/D or decode alone, the health loop; `Router.from_config`
builds it from a checked `RouterConfig` (config.py), which the command line (server.py) parses.
Must not touch: engines or the store, the command line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid

import aiohttp
import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvrelay import security
from kvrelay.params import DO_REMOTE_PREFILL, PREFIX_STORE, PREFIX_TOKENS, RELAY_ID, STORE_ADDRESS
from kvrelay.router.cacheview import CacheView
from kvrelay.router.config import RouterConfig
from kvrelay.router.legs import Legs, encode
from kvrelay.router.members import MemberPools
from kvrelay.router.metrics import RouterMetrics
from kvrelay.router.policy import Decision, Policy
from kvrelay.router.pool import NoWorkerError, Pool, Worker
from kvrelay.router.relay import ClientGone, error_response
from kvrelay.router.retry import RetryPolicy
from kvrelay.router.store import PrefillStores, StoreWatch
from kvrelay.router.upstream import Upstream
from kvrelay.security import params as signed_params
from kvrelay.security.http import auth_headers, protect

log = logging.getLogger("kvrelay.router")


class Router:
    def __init__(self, prefill: Pool, decode: Pool, health_interval: float = 2.0, timeout: float = 600.0, *,
                 retry: RetryPolicy | None = None, probe_interval: float = 0.2,
                 store: StoreWatch | None = None, stores: PrefillStores | None = None,
                 prefill_connections: int = 1000, decode_connections: int = 1000,
                 prefill_drain: float = 30.0, policy: Policy | None = None,
                 cache: CacheView | None = None, members: MemberPools | None = None) -> None:
        self.prefill, self.decode, self.store = prefill, decode, store
        self.stores = stores  # a store on every host: the store of each prefill (store.py)
        self.members = members  # --etcd: the pools follow the cluster's membership
        self.health_interval, self.probe_interval = health_interval, probe_interval
        self.request_timeout = timeout
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        # one connection pool per leg (upstream.py), each with its own connection limit, and an aiohttp session
        # for the health probes and the workers' tokenization
        self.limits = {"prefill": prefill_connections, "decode": decode_connections, "health": 100}
        self.sessions: dict[str, aiohttp.ClientSession] = {}
        self.upstreams: dict[str, Upstream] = {}
        self.prefill_drain = prefill_drain
        self._draining: set[asyncio.Task] = set()
        self.policy = policy or Policy(prefill.policy, cache.index if cache is not None else None)
        if cache is None and self.policy.needs_tokens:  # e.g. --decode-only-below alone: tokens, no events
            cache = CacheView([])
        self.cache = cache
        if cache is not None:
            self.policy.followed = {s.name for s in cache.sources}
        self.policy.store_up = self._store_up  # hints skip a store whose breaker is open
        self.metrics = RouterMetrics((prefill, decode), store, self.policy,
                                     list(stores.watches.values()) if stores is not None else ())
        self.legs = Legs(prefill, decode, retry or RetryPolicy(), self.metrics, self._upstream, stores)
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

    @classmethod
    def from_config(cls, config: RouterConfig) -> Router:
        """The router ``config`` describes (the config checked its values)."""
        store = (StoreWatch(config.store, interval=config.health_interval, probe_interval=config.probe_interval)
                 if config.store else None)
        sources = config.event_sources()
        cache = CacheView(sources, config.tokenizer or None) if config.reads_cache else None
        if config.policy == "cache_aware" and not sources:
            log.warning("--policy cache_aware without --events: no cache is known, it routes by load alone")
        policy = Policy(config.policy, cache.index if cache is not None else None, config.disagg(),
                        config.overlap_weight, config.balance())
        prefill = Pool("prefill", list(config.prefill), config.policy, config.breaker_failures, config.engine_load)
        decode = Pool("decode", list(config.decode), config.policy, config.breaker_failures, config.engine_load)
        members = MemberPools(config.etcd, config.cluster, prefill, decode) if config.etcd else None
        return cls(prefill, decode, config.health_interval, config.timeout,
                   retry=RetryPolicy(config.retries, config.retry_backoff, config.retry_backoff_max),
                   probe_interval=config.probe_interval, store=store,
                   stores=PrefillStores.of(config.prefill_stores, config.prefill, config.health_interval,
                                           config.probe_interval),
                   prefill_connections=config.prefill_connections, decode_connections=config.decode_connections,
                   prefill_drain=config.prefill_drain, policy=policy, cache=cache, members=members)

    def _session(self, role: str) -> aiohttp.ClientSession:
        """The session of one leg ("prefill", "decode") or of the probes ("health"); they exist while the app
        runs (from its startup to its cleanup)."""
        session = self.sessions.get(role)
        if session is None:
            raise RuntimeError("the router's HTTP sessions are not open: the app is not running")
        return session

    def _upstream(self, role: str) -> Upstream:
        """The connections of one leg ("prefill", "decode"), open while the app runs."""
        upstream = self.upstreams.get(role)
        if upstream is None:
            raise RuntimeError("the router's upstream connections are not open: the app is not running")
        return upstream

    @property
    def http(self) -> aiohttp.ClientSession:
        return self._session("health")

    async def _start(self, app: web.Application) -> None:
        self.sessions = {"health": aiohttp.ClientSession(timeout=self.timeout, connector=aiohttp.TCPConnector(
            limit=self.limits["health"], limit_per_host=0), headers=auth_headers(self.keys))}
        self.upstreams = {role: Upstream(self.limits[role], self.request_timeout, auth_headers(self.keys))
                          for role in ("prefill", "decode")}
        await self._check(only_down=False)
        if self.members is not None:
            self.members.start()
        if self.store is not None:
            await self.store.check()
            self.store.start()
        if self.stores is not None:
            await self.stores.check()
            self.stores.start()
        self._health_task = asyncio.create_task(self._health_loop())
        if self.cache is not None:
            self.cache.start()

    async def _stop(self, app: web.Application) -> None:
        self._health_task.cancel()
        for task in list(self._draining):
            task.cancel()
        await asyncio.gather(*self._draining, return_exceptions=True)
        if self.members is not None:
            await self.members.stop()
        if self.store is not None:
            await self.store.stop()
        if self.stores is not None:
            await self.stores.stop()
        if self.cache is not None:
            await self.cache.stop()
        for session in self.sessions.values():
            await session.close()
        for upstream in self.upstreams.values():
            await upstream.close()
        self.sessions, self.upstreams = {}, {}

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
                "stores": self.stores.state() if self.stores is not None else None,
                "store": self.store.state() if self.store is not None else None, "pid": os.getpid(),
                "etcd": self.members.state() if self.members is not None else None}
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
        raw = await request.read()
        try:
            body = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            return error_response(400, f"the request body is not valid JSON: {exc}")
        if not isinstance(body, dict):
            return error_response(400, "the request body must be a JSON object")
        if self.keys is not None and "kv_transfer_params" in body:  # only the router sets them (signed:
            body = signed_params.strip(body)                         # kvrelay/security/params.py)
            raw = encode(body)
        try:
            return await self._route(request, body, raw)
        except ClientGone as gone:
            self.metrics.requests.labels("client_gone").inc()
            return gone.response
        except asyncio.CancelledError:  # the client disconnected (kvrelay.serving cancels the handler)
            self.metrics.requests.labels("client_gone").inc()
            raise

    async def _route(self, request: web.Request, body: dict, raw: bytes) -> web.StreamResponse:
        """Route ``body``; ``raw``: its bytes, sent as they are where the router adds nothing."""
        if self.store is not None and not self.store.up:
            self.metrics.routes.labels("decode_only_store_down").inc()
            return await self.legs.decode(request, raw)
        if not self.prefill.healthy():
            log.warning("no prefill worker in service: the decode worker computes the whole request")
            self.metrics.routes.labels("decode_only_no_prefill").inc()
            return await self.legs.decode(request, raw)
        tokens = None
        if self.cache is not None and self.policy.needs_tokens:  # the workers' own tokenization where they offer it
            workers = [w.url for w in (*self.prefill.healthy(), *self.decode.healthy())]
            tokens = await self.cache.tokens(request.path, body, workers, self.http)
        salt = body.get("cache_salt")
        salt = salt if isinstance(salt, str) else ""  # another type: the engines refuse the request, naming it
        try:
            d = self.policy.decide(self.prefill, self.decode, tokens, store_up=self.store is None or self.store.up,
                                   salt=salt)
        except NoWorkerError:  # no decode worker in service: the decode leg answers why
            return await self.legs.decode(request, raw)
        d = self.legs.pass_over_dead_stores(d)  # a store on every host: not a prefill whose store is down
        self.metrics.routes.labels(d.reason).inc()
        self.policy.routed(d, tokens, salt)
        with d.decode.hold(tokens=d.prompt_tokens, seqs=1):  # its queued tokens until the request is answered
            return await self._legs(request, body, raw, d)

    def _store_up(self, address: str) -> bool:
        """Whether a store of a store on every host answers (one the router does not watch: assumed so)."""
        watch = self.stores.watches.get(address) if self.stores is not None else None
        return watch is None or watch.up

    async def _legs(self, request: web.Request, body: dict, raw: bytes, d: Decision) -> web.StreamResponse:
        if not d.pull and d.prefix is None:  # the decode worker computes the prompt itself
            return await self.legs.decode(request, raw, first=d.decode)
        rid = str(body.get("request_id") or f"kvrelay-{uuid.uuid4().hex}")
        body = {**body, "request_id": rid}
        if d.prefix is not None:  # it computes the prompt after loading the prefix a store holds (policy.py)
            hint = {PREFIX_STORE: d.prefix.store, PREFIX_TOKENS: d.prefix.tokens, RELAY_ID: rid}
            hinted = {**body, "kv_transfer_params": signed_params.sign(self.keys, hint, rid) if self.keys else hint}
            return await self.legs.decode(request, encode(hinted), first=d.decode)
        # kvrelay_request_id: vLLM names each leg's request itself; the shared id lets a prefill's abort
        # in the store reach the decode's waiting pulls there too (the reference engines use request_id)
        params = self.legs.decode_params({DO_REMOTE_PREFILL: True, RELAY_ID: rid}, d.prefill)  # + its store
        if d.store is not None:  # a store on every host holds the whole prompt: the decode pulls it from there
            params = {**params, STORE_ADDRESS: d.store}
        pull = {**body, "kv_transfer_params": signed_params.sign(self.keys, params, rid) if self.keys else params}
        if d.prefill is None:  # the store holds the whole prompt: the decode pulls it, no prefill leg
            return await self.legs.decode(request, encode(pull), first=d.decode)
        stop = asyncio.Event()
        prefill = self._prefill_leg(request.path, body, stop, d.prefill, d.prefill_tokens)
        try:
            return await self.legs.decode(request, encode(pull), first=d.decode)
        except (asyncio.CancelledError, ClientGone):  # the client left: the prefill leg serves no one (its
            prefill.cancel()                          # engine aborts it; the decode leg's was closed already)
            raise
        finally:
            if not prefill.done():  # the decode is answered: the prefill leg has no one left to serve
                stop.set()
                self._drain(prefill)

    def _prefill_leg(self, path: str, body: dict, stop: asyncio.Event, worker: Worker, load: int) -> asyncio.Task:
        """The prefill leg as a task.  Its tokens count as queued on ``worker`` until it ends, and until it
        starts it counts as in flight there: a burst of requests picked before any of their tasks ran must not
        all pick one worker."""
        queued = worker.hold(tokens=load)
        reserved = worker.hold(requests=1)

        async def leg() -> bool:
            reserved.release()  # the leg counts itself from its first attempt on
            return await self.legs.prefill(path, body, stop, first=worker)
        task = asyncio.create_task(leg())

        def done(_: asyncio.Task) -> None:
            reserved.release()  # cancelled before it started (else: released already)
            queued.release()
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
