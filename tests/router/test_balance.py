"""cache_aware against herding (kvrelay/router/balance.py, policy.py) and the load the router counts (pool.py).

Fast tier: the policy over a synthetic KV index; the load accounting through a router served in this
process over in-process fake workers (router_fakes), no child process.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web
from router_fakes import Worker, with_router
from test_policy import D, P, pools, prompt, publish
from waiting import await_until

from kvrelay.router.balance import Balance
from kvrelay.router.cacheview import CacheView
from kvrelay.router.config import RouterConfig
from kvrelay.router.kvindex import KVIndex
from kvrelay.router.policy import Disagg, Policy
from kvrelay.router.pool import Pool
from kvrelay.router.retry import RetryPolicy
from kvrelay.serving import start_serving

NO_DECODE_ONLY = Disagg(decode_hit=2.0)


def hot_setup(balance: Balance | None = None):
    idx = KVIndex()
    system = prompt(1, 1536)
    publish(idx, P[0], system)  # prefill worker 0 holds the hot prefix
    pre, dec = pools()
    return Policy("cache_aware", idx, NO_DECODE_ONLY, balance=balance), pre, dec, system


def test_a_deep_queue_on_the_hot_prefix_holder_sends_new_requests_elsewhere():
    pol, pre, dec, system = hot_setup()
    user = system + prompt(9, 64)
    queue = [pre.workers[0].hold(requests=1, tokens=64) for _ in range(5)]  # 5 requests deep, the other idle
    assert pol.decide(pre, dec, user).prefill is pre.workers[1]
    # negative control: without the guard the cost alone keeps the holder (64 new tokens + its queue of
    # 5 x (64 + 32) against 1,600 cold tokens elsewhere): the herding the guard exists for
    nog, pre2, dec2, _ = hot_setup(Balance(abs_requests=0))
    for _ in range(5):
        pre2.workers[0].hold(requests=1, tokens=64)
    assert nog.decide(pre2, dec2, user).prefill is pre2.workers[0]
    for q in queue:
        q.release()


def test_a_burst_on_one_hot_prefix_spreads_and_the_cache_still_takes_most():
    """16 requests for one hot prefix at once, each holding its load as the app does: the holder takes most,
    the other worker some (without the guard: all 16 on the holder)."""
    def burst(balance: Balance) -> list[int]:
        pol, pre, dec, system = hot_setup(balance)
        for i in range(16):
            d = pol.decide(pre, dec, system + prompt(100 + i, 64))
            assert d.prefill is not None
            d.prefill.hold(requests=1, tokens=d.prefill_tokens)
            d.decode.hold(requests=1, tokens=d.prompt_tokens, seqs=1)
        return [w.in_flight for w in pre.workers]
    guarded = burst(Balance())
    assert guarded[0] > guarded[1] > 0 and guarded[0] - guarded[1] <= 4 + 1
    assert burst(Balance(abs_requests=0)) == [16, 0]


def test_the_cache_wins_while_load_is_even():
    pol, pre, dec, system = hot_setup()
    user = system + prompt(9, 64)
    assert pol.decide(pre, dec, user).prefill is pre.workers[0]  # both idle
    held = [w.hold(requests=2, tokens=200) for w in pre.workers]  # both equally busy
    assert pol.decide(pre, dec, user).prefill is pre.workers[0]
    more = pre.workers[0].hold(requests=3, tokens=300)  # 3 deeper: within --balance-abs 4
    assert pol.decide(pre, dec, user).prefill is pre.workers[0]
    for h in (*held, more):
        h.release()
    # a prompt nobody holds goes by load (negative control for the cache credit)
    busy = pre.workers[0].hold(requests=1, tokens=500)
    assert pol.decide(pre, dec, prompt(5, 1600)).prefill is pre.workers[1]
    busy.release()


def test_decode_load_counts_sequences_and_kv_tokens():
    pol, pre, dec, system = hot_setup()
    held = dec.workers[0].hold(requests=2, tokens=4000, seqs=2)
    assert pol.load(dec.workers[0]) == 4000 + 2 * 32 and pol.load(dec.workers[1]) == 0
    assert pol.decide(pre, dec, system + prompt(3, 64)).decode is dec.workers[1]
    held.release()
    assert (dec.workers[0].load_tokens, dec.workers[0].seqs, dec.workers[0].in_flight) == (0, 0, 0)


def test_temperature_draws_among_eligible_workers_only():
    pol, pre, dec, system = hot_setup(Balance(temperature=1.0))
    user = system + prompt(9, 64)
    assert {pol.decide(pre, dec, user).prefill.url for _ in range(40)} == set(P)  # near-best: both drawn
    deep = pre.workers[1].hold(requests=6)  # now out of the guard's bounds: never drawn
    assert {pol.decide(pre, dec, user).prefill.url for _ in range(20)} == {P[0]}
    deep.release()


@pytest.mark.parametrize("flags, message", [
    ({"balance_abs": -1}, "--balance-abs -1"),
    ({"balance_rel": 0.5}, "--balance-rel 0.5"),
    ({"balance_rel": float("nan")}, "--balance-rel nan"),
    ({"route_temperature": -0.1}, "--route-temperature -0.1"),
    ({"request_tokens": -3}, "--request-tokens -3"),
])
def test_bad_balance_settings_are_refused_naming_the_flag(flags, message):
    with pytest.raises(ValueError, match=message):
        RouterConfig(decode=(D[0],), **flags)


def test_a_load_is_never_negative_and_released_once():
    w = Pool("prefill", P).workers[0]
    with pytest.raises(ValueError, match="not negative"):
        w.hold(tokens=-1)
    load = w.hold(requests=1, tokens=10, seqs=1)
    load.release()
    load.release()
    assert (w.in_flight, w.load_tokens, w.seqs) == (0, 0, 0)


@pytest.mark.timeout(60)
def test_load_returns_to_zero_after_completions_failures_and_cancellations():
    async def main():
        pre = Worker("prefill", params={"request_id": "r"})
        good = Worker("decode", stream_chunks=3)
        bad = Worker("decode", status=500)
        slow = Worker("decode", stream_chunks=3)
        gate = asyncio.Event()
        slow.wait_for = gate  # its decode waits until the client has left
        urls = [await w.start() for w in (pre, good, bad, slow)]
        body = {"prompt": list(range(1, 200)), "max_tokens": 3, "stream": True}

        async def through(decode_url: str, fn) -> None:
            cache = CacheView([])

            async def check(router, session, url):
                workers = [*router.prefill.workers, *router.decode.workers]

                def idle() -> bool:
                    return all((w.in_flight, w.load_tokens, w.seqs) == (0, 0, 0) for w in workers)
                await fn(url, session, idle)
                await await_until(idle, 5, f"every load released ({decode_url})")
            await with_router(urls[:1], [decode_url], check, retry=RetryPolicy(retries=0),
                              policy=Policy("cache_aware", cache.index, NO_DECODE_ONLY), cache=cache)

        async def complete(url, session, idle):
            for _ in range(3):
                async with session.post(url + "/v1/completions", json=body) as r:
                    assert r.status == 200 and (await r.read()).endswith(b"data: [DONE]\n\n")

        async def fail(url, session, idle):
            async with session.post(url + "/v1/completions", json=body) as r:
                await r.read()
            assert bad.bodies  # the decode leg failed (HTTP 500, no retry)

        async def cancel(url, session, idle):
            async with aiohttp.ClientSession() as client:
                task = asyncio.create_task(client.post(url + "/v1/completions", json=body))
                await await_until(lambda: slow.received.is_set(), 5, "the decode leg reached its worker")
                assert not idle()  # the request holds its load while in flight
                task.cancel()  # the client leaves while its decode leg waits
                with pytest.raises(asyncio.CancelledError):
                    await task
        try:
            await through(urls[1], complete)
            await through(urls[2], fail)
            await through(urls[3], cancel)
        finally:
            gate.set()
            for w in (pre, good, bad, slow):
                await w.stop()
    asyncio.run(main())


@pytest.mark.timeout(60)
def test_requests_other_clients_sent_count_from_the_engines_metrics():
    """A probe reads each engine's /metrics (the reference engine's names; vLLM's are parsed alike): requests
    there beyond this router's own make the worker deeper; a worker without the page is not asked again."""
    page = {"text": "# TYPE kvrelay_engine_waiting gauge\nkvrelay_engine_waiting 7.0\n"
                    "# TYPE kvrelay_engine_running gauge\nkvrelay_engine_running 3.0\n"}

    async def main():
        async def healthz(request):
            return web.json_response({"ok": True})

        async def metrics(request):
            return web.Response(text=page["text"])
        busy = web.Application()
        busy.router.add_get("/healthz", healthz)
        busy.router.add_get("/metrics", metrics)
        bare = web.Application()
        bare.router.add_get("/healthz", healthz)
        runners = [await start_serving(app, "127.0.0.1", 0) for app in (busy, bare)]
        urls = [f"http://127.0.0.1:{r.addresses[0][1]}" for r in runners]
        try:
            pre = Pool("prefill", urls, "cache_aware", read_engine_load=True)
            own = pre.workers[0].hold(requests=2)  # 2 of the engine's 10 are this router's
            async with aiohttp.ClientSession() as session:
                await pre.check(session)
                assert (pre.workers[0].others, pre.workers[0].depth) == (8, 10)
                assert pre.workers[0].engine is not None and pre.workers[0].engine.requests == 10
                assert pre.workers[1].metrics_path == "" and pre.workers[1].depth == 0  # no page: never asked again
                idx = KVIndex()
                system = prompt(1, 1536)
                publish(idx, urls[0], system)  # the busy engine holds the prefix: the guard still sends it away
                _, dec = pools()
                d = Policy("cache_aware", idx, NO_DECODE_ONLY).decide(pre, dec, system + prompt(2, 64))
                assert d.prefill is pre.workers[1]
                own.release()
                page["text"] = "kvrelay_engine_waiting 0\nkvrelay_engine_running 0\n"  # drained
                await pre.check(session)
                assert pre.workers[0].others == 0
                page["text"] = "not a metrics page {"  # a bad page: no change, and the worker stays in service
                pre.workers[0].others = 3
                await pre.check(session)
                assert pre.workers[0].others == 3 and pre.workers[0].healthy
        finally:
            for r in runners:
                await r.cleanup()
    asyncio.run(main())


def test_where_the_cache_tells_no_worker_apart_cache_aware_picks_as_least_loaded():
    """A prompt no worker holds: cache_aware goes by requests in flight, as least_loaded does (balancing by
    tokens there measured worse on the unique-prompt workload); once a worker holds its prefix, tokens count."""
    pol, pre, dec, system = hot_setup()
    cold = prompt(77, 600)
    long_one = pre.workers[0].hold(requests=1, tokens=5000)
    short = [pre.workers[1].hold(requests=1, tokens=10) for _ in range(2)]
    assert pol.decide(pre, dec, cold).prefill is pre.workers[0]  # 1 request against 2, whatever their tokens
    least = Policy("least_loaded", None, NO_DECODE_ONLY)
    pre.policy = "least_loaded"
    assert least.decide(pre, dec, cold).prefill is pre.workers[0]
    pre.policy = "cache_aware"
    # negative control: the prefix holder (worker 0) is passed over for its 5,000 queued tokens
    assert pol.decide(pre, dec, system + prompt(9, 64)).prefill is pre.workers[1]
    for h in (long_one, *short):
        h.release()
