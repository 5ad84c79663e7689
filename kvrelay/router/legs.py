"""The two legs of a request, each retried with jittered backoff on another worker (or the same one when
every worker in service was tried).

Prefill leg: a non-streaming copy of the request with ``max_tokens: 1`` and ``kv_transfer_params:
{"do_remote_decode": true}``; chunks are content-addressed, so a failed attempt is simply sent again
under the same request id and the waiting decode never notices.  A prefill leg whose decode was
answered first is not cancelled mid-request (that would close its pooled connection: one new TCP
connection per such request); the router lets it finish in the background within a bound
(app.py) and it makes no further attempt (``stop``).  Decode leg: the client's request (with
``do_remote_prefill`` under P/D), relayed by relay.py; an attempt that fails before anything reached the
client is retried with the same body (same request id and kv_transfer_params: the new decode worker
pulls what the prefill leg, still running, publishes); one that fails after ends the client's stream
with an error event.  With a store on every host, the decode leg's params name the store its prefill
publishes into (`decode_params`), and a prefill leg's retries stay on workers of that store.  Failures feed
the workers' breakers (pool.py).  Bodies go out as bytes encoded by
msgspec (the decode leg's as the app hands them over: the client's own bytes where nothing was added), and
of the prefill's answer only ``kv_transfer_params`` is decoded.

Owns: `Legs`.  Must not touch: routing between P/D and decode alone (app.py), health probes (pool.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Set as AbstractSet
from typing import Any

import msgspec
from aiohttp import web

from kvrelay import security
from kvrelay.params import DO_REMOTE_DECODE, RELAY_ID, STORE_ADDRESS
from kvrelay.router.metrics import RouterMetrics
from kvrelay.security import params as signed_params
from kvrelay.router.policy import Decision
from kvrelay.router.pool import NoWorkerError, Pool, Worker
from kvrelay.router.relay import DEAD_PROCESS, LegFailure, describe, error_response, relay
from kvrelay.router.retry import RetryPolicy
from kvrelay.router.store import PrefillStores
from kvrelay.router.upstream import Upstream, UpstreamError

log = logging.getLogger("kvrelay.router")
encode = msgspec.json.Encoder().encode


class _PrefillAnswer(msgspec.Struct):
    """The one field of a prefill's answer the router reads (the rest is skipped, not decoded)."""
    kv_transfer_params: Any = None


_prefill_answer = msgspec.json.Decoder(_PrefillAnswer)


def published(answer: bytes) -> bool:
    """Whether a prefill's answer says it published the prompt's KV (non-empty ``kv_transfer_params``);
    msgspec.DecodeError if it is not JSON."""
    if not answer.strip():
        return False
    try:
        return bool(_prefill_answer.decode(answer).kv_transfer_params)
    except msgspec.ValidationError:  # JSON, but not an object with that field
        return False


class Legs:
    def __init__(self, prefill: Pool, decode: Pool, retry: RetryPolicy, metrics: RouterMetrics,
                 http: Callable[[str], Upstream], stores: PrefillStores | None = None) -> None:
        """``http(role)``: the connections (own limit) to that leg's workers; ``stores``: each prefill's store
        (a store on every host)."""
        self.prefill_pool, self.decode_pool = prefill, decode
        self.retry, self.metrics, self.http = retry, metrics, http
        self.stores = stores

    @staticmethod
    def _pick(pool: Pool, tried: set[str], exclude: AbstractSet[str] = frozenset()) -> Worker:
        """A worker in service not tried yet, else any in service (all were tried: retry one), never one of
        ``exclude``; NoWorkerError."""
        try:
            return pool.pick(tried | exclude)
        except NoWorkerError:
            if not tried:
                raise
            return pool.pick(exclude)

    def pass_over_dead_stores(self, d: Decision) -> Decision:
        """With a store on every host: ``d``, or while its prefill's store is down, ``d`` with another prefill in
        service whose store is up, else the decode alone (it computes the prompt: nothing to pull)."""
        if self.stores is None or d.prefill is None or self.stores.up(d.prefill.url):
            return d
        down = self.stores.passed_over(w.url for w in self.prefill_pool.workers)
        try:
            return dataclasses.replace(d, prefill=self.prefill_pool.pick(down))
        except NoWorkerError:
            return Decision("decode_only_store_down", d.decode, None, False, d.prompt_tokens)

    def decode_params(self, params: dict[str, Any], prefill: Worker | None) -> dict[str, Any]:
        """A decode leg's light ``kv_transfer_params`` naming the store ``prefill`` publishes into (a store on
        every host: the decode pulls from it), before they are signed; unchanged with one store."""
        address = self.stores.address_of(prefill.url) if self.stores is not None and prefill is not None else None
        return {**params, STORE_ADDRESS: address} if address else params


    async def prefill(self, path: str, body: dict, stop: asyncio.Event | None = None,
                      first: Worker | None = None) -> bool:
        """Run the prefill leg; True once a worker published the prompt's KV.  No attempt starts once
        ``stop`` is set (the decode was answered); ``first``: the first attempt's worker (the policy's pick)."""
        rid = body["request_id"]
        params = {DO_REMOTE_DECODE: True, RELAY_ID: rid}
        if (keys := security.current()) is not None:  # engines with keys serve only signed params
            params = signed_params.sign(keys, params, rid)
        leg = {**body, "stream": False, "max_tokens": 1, "kv_transfer_params": params}
        leg.pop("max_completion_tokens", None)
        data = encode(leg)
        tried: set[str] = set()
        # a store on every host: the decode pulls from the first worker's store, so a retry stays on that store
        exclude = self.stores.others(first.url, (w.url for w in self.prefill_pool.workers)) \
            if self.stores is not None and first is not None else frozenset()
        for attempt in range(self.retry.retries + 1):
            if attempt:
                await asyncio.sleep(self.retry.delay(attempt))
            if stop is not None and stop.is_set():
                return False
            try:
                worker = first if first is not None and not attempt and first.healthy else \
                    self._pick(self.prefill_pool, tried, exclude)
            except NoWorkerError as exc:
                log.warning("prefill leg of %s: no worker left; the decode recomputes after its deadline: %s", rid, exc)
                return False
            if attempt:
                self.metrics.retries.labels("prefill").inc()
            tried.add(worker.url)
            attempt_load = worker.hold(requests=1)
            t0 = time.monotonic()
            log.debug("prefill leg of %s: attempt %d on %s", rid, attempt + 1, worker.url)
            try:
                async with self.http("prefill").post(worker.url + path, data) as r:
                    log.debug("prefill leg of %s: HTTP %d after %.3f s", rid, r.status, time.monotonic() - t0)
                    answer = await r.read()
                if r.status >= 500:
                    raise LegFailure(f"HTTP {r.status}: {answer[:300]!r}", fatal=False)
                ok = published(answer)
            except (LegFailure, UpstreamError, asyncio.TimeoutError, msgspec.DecodeError) as exc:
                fatal = isinstance(exc, DEAD_PROCESS) or (isinstance(exc, LegFailure) and exc.fatal)
                self.prefill_pool.mark_failed(worker, str(exc) if isinstance(exc, LegFailure) else describe(exc), fatal)
                log.warning("prefill worker %s failed on %s (%s)", worker.url, rid, describe(exc))
                continue
            finally:
                attempt_load.release()
            self.prefill_pool.mark_ok(worker)
            self.metrics.prefill_latency.observe(time.monotonic() - t0)  # answered: not cancelled, not failed
            if r.status >= 400:  # the request itself is bad: the decode leg says why to the client
                return False
            if not ok:  # e.g. the store was full:
                log.warning("prefill of %s published nothing (the decode recomputes after its deadline)", rid)
                return False  # nothing was published, and another prefill worker would meet the same store
            return True
        log.warning("prefill leg of %s failed %d times; the decode recomputes after its deadline", rid,
                    self.retry.retries + 1)
        return False

    async def decode(self, request: web.Request, body: bytes, first: Worker | None = None) -> web.StreamResponse:
        """Run the decode leg with ``body`` (a JSON object's bytes) and answer the client (raises relay.ClientGone
        if the client left); ``first``: the first attempt's worker (the policy's pick)."""
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
            attempt_load = worker.hold(requests=1)
            try:
                async with self.http("decode").post(worker.url + request.path, body) as r:
                    if r.status >= 500:
                        data = await r.read()
                        raise LegFailure(f"HTTP {r.status}: {data[:300]!r}", fatal=False, response=web.Response(
                            body=data, status=r.status, headers={"Content-Type": r.content_type}))
                    resp, cut = await relay(request, r, worker.url)
            except LegFailure as exc:
                last = exc
            except UpstreamError as exc:  # before the answer's headers (connect, send, or a reset)
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
                attempt_load.release()
            self.decode_pool.mark_failed(worker, str(last), last.fatal)
            log.warning("decode worker %s failed before answering (%s)", worker.url, last)
        assert last is not None  # the loop ran at least once and every attempt failed
        self.metrics.requests.labels("decode_failed").inc()
        if last.response is not None:
            return last.response
        return error_response(502, f"the decode leg failed on {len(tried)} worker(s) in {sent} attempt(s); "
                                   f"last error: {last}")
