"""The two legs of a request, each retried with jittered backoff on another worker (or the same one when
every worker in service was tried).

Prefill leg: a non-streaming copy of the request with ``max_tokens: 1`` and ``kv_transfer_params:
{"do_remote_decode": true}``; chunks are content-addressed, so a failed attempt is simply sent again
under the same request id and the waiting decode never notices.  A prefill leg whose decode was
answered first is not cancelled mid-request (that would close its pooled connection: one new TCP
connection per such request); the router lets it finish in the background within a bound
(server.py) and it makes no further attempt (``stop``).  Decode leg: the client's request (with
``do_remote_prefill`` under P/D), relayed by relay.py; an attempt that fails before anything reached the
client is retried with the same body (same request id and kv_transfer_params: the new decode worker
pulls what the prefill leg, still running, publishes); one that fails after ends the client's stream
with an error event.  Failures feed the workers' breakers (pool.py).

Owns: `Legs`.  Must not touch: routing between P/D and decode alone (server.py), health probes (pool.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

import aiohttp
from aiohttp import web

from kvrelay import security
from kvrelay.router.metrics import RouterMetrics
from kvrelay.security import params as signed_params
from kvrelay.router.pool import NoWorkerError, Pool, Worker
from kvrelay.router.relay import DEAD_PROCESS, LegFailure, describe, error_response, relay
from kvrelay.router.retry import RetryPolicy

RELAY_ID = "kvrelay_request_id"  # = kvrelay.engines.vllm.meta.RELAY_ID (not imported: no engine code here)

log = logging.getLogger("kvrelay.router")


class Legs:
    def __init__(self, prefill: Pool, decode: Pool, retry: RetryPolicy, metrics: RouterMetrics,
                 http: Callable[[str], aiohttp.ClientSession]) -> None:
        """``http(role)``: the session (own connector, own connection limit) of that leg's workers."""
        self.prefill_pool, self.decode_pool = prefill, decode
        self.retry, self.metrics, self.http = retry, metrics, http

    @staticmethod
    def _pick(pool: Pool, tried: set[str]) -> Worker:
        """A worker in service not tried yet, else any in service (all were tried: retry one); NoWorkerError."""
        try:
            return pool.pick(tried)
        except NoWorkerError:
            if not tried:
                raise
            return pool.pick()


    async def prefill(self, path: str, body: dict, stop: asyncio.Event | None = None,
                      first: Worker | None = None) -> bool:
        """Run the prefill leg; True once a worker published the prompt's KV.  No attempt starts once
        ``stop`` is set (the decode was answered); ``first``: the first attempt's worker (the policy's pick)."""
        rid = body["request_id"]
        params = {"do_remote_decode": True, RELAY_ID: rid}
        if (keys := security.current()) is not None:  # engines with keys serve only signed params
            params = signed_params.sign(keys, params, rid)
        leg = {**body, "stream": False, "max_tokens": 1, "kv_transfer_params": params}
        leg.pop("max_completion_tokens", None)
        tried: set[str] = set()
        for attempt in range(self.retry.retries + 1):
            if attempt:
                await asyncio.sleep(self.retry.delay(attempt))
            if stop is not None and stop.is_set():
                return False
            try:
                worker = first if first is not None and not attempt and first.healthy else \
                    self._pick(self.prefill_pool, tried)
            except NoWorkerError as exc:
                log.warning("prefill leg of %s: no worker left; the decode recomputes after its deadline: %s", rid, exc)
                return False
            if attempt:
                self.metrics.retries.labels("prefill").inc()
            tried.add(worker.url)
            worker.in_flight += 1
            t0 = time.monotonic()
            try:
                async with self.http("prefill").post(worker.url + path, json=leg) as r:
                    data = await r.json(content_type=None)
                if r.status >= 500:
                    raise LegFailure(f"HTTP {r.status}: {data}", fatal=False)
            except (LegFailure, aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
                fatal = isinstance(exc, DEAD_PROCESS) or (isinstance(exc, LegFailure) and exc.fatal)
                self.prefill_pool.mark_failed(worker, str(exc) if isinstance(exc, LegFailure) else describe(exc), fatal)
                log.warning("prefill worker %s failed on %s (%s)", worker.url, rid, describe(exc))
                continue
            finally:
                worker.in_flight -= 1
            self.prefill_pool.mark_ok(worker)
            self.metrics.prefill_latency.observe(time.monotonic() - t0)  # answered: not cancelled, not failed
            if r.status >= 400:  # the request itself is bad: the decode leg says why to the client
                return False
            if not (isinstance(data, dict) and data.get("kv_transfer_params")):  # e.g. the store was full:
                log.warning("prefill of %s published nothing (the decode recomputes after its deadline)", rid)
                return False  # nothing was published, and another prefill worker would meet the same store
            return True
        log.warning("prefill leg of %s failed %d times; the decode recomputes after its deadline", rid,
                    self.retry.retries + 1)
        return False

    async def decode(self, request: web.Request, body: dict, first: Worker | None = None) -> web.StreamResponse:
        """Run the decode leg and answer the client (raises relay.ClientGone if the client left);
        ``first``: the first attempt's worker (the policy's pick)."""
        tried: set[str] = set()
        last: LegFailure | None = None
        sent = 0
        for attempt in range(self.retry.retries + 1):
            if attempt:
                await asyncio.sleep(self.retry.delay(attempt))
            try:
                worker = first if first is not None and not attempt and first.healthy else \
                    self._pick(self.decode_pool, tried)
            except NoWorkerError as exc:
                if last is None:
                    self.metrics.requests.labels("no_decode_worker").inc()
                    return error_response(503, str(exc))
                break  # it failed, and no worker is left in service to retry on
            if attempt:
                self.metrics.retries.labels("decode").inc()
            sent += 1
            tried.add(worker.url)
            worker.in_flight += 1
            try:
                async with self.http("decode").post(worker.url + request.path, json=body) as r:
                    if r.status >= 500:
                        data = await r.read()
                        raise LegFailure(f"HTTP {r.status}: {data[:300]!r}", fatal=False, response=web.Response(
                            body=data, status=r.status, headers={"Content-Type": r.headers.get("Content-Type", "")}))
                    resp, cut = await relay(request, r, worker.url)
            except LegFailure as exc:
                last = exc
            except aiohttp.ClientError as exc:  # before the answer's headers (connect, send, or a reset)
                last = LegFailure(describe(exc), isinstance(exc, DEAD_PROCESS))
            except asyncio.TimeoutError:  # the whole request's timeout: not retried (it would wait as long again)
                self.decode_pool.mark_failed(worker, "timed out")
                self.metrics.requests.labels("decode_timeout").inc()
                return error_response(504, f"decode worker {worker.url} did not answer within the router's timeout")
            else:
                if cut:
                    self.decode_pool.mark_failed(worker, f"failed mid-stream: {cut}", fatal=True)
                    self.metrics.requests.labels("decode_failed_midstream").inc()
                    log.warning("decode worker %s failed mid-stream (%s): the client got an error event", worker.url,
                                cut)
                else:
                    self.decode_pool.mark_ok(worker)
                    self.metrics.requests.labels("ok" if r.status < 400 else f"http_{r.status}").inc()
                return resp
            finally:
                worker.in_flight -= 1
            self.decode_pool.mark_failed(worker, str(last), last.fatal)
            log.warning("decode worker %s failed before answering (%s)", worker.url, last)
        assert last is not None  # the loop ran at least once and every attempt failed
        self.metrics.requests.labels("decode_failed").inc()
        if last.response is not None:
            return last.response
        return error_response(502, f"the decode leg failed on {len(tried)} worker(s) in {sent} attempt(s); "
                                   f"last error: {last}")
