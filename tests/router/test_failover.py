"""Router failover (issue 13): retries with jittered backoff, a breaker per worker and its probe, decode
workers that die before their first token or mid-stream, and the bounded prefill-latency metric.

Fake workers (router_fakes.py) on 127.0.0.1 fail on demand; the tests count attempts, breaker openings and
events, and bound times generously (they print what they measured).
"""

import asyncio
import json
import time

import openai
import pytest
from router_fakes import Worker, with_router
from waiting import await_until

from kvrelay.router.breaker import Breaker, BreakerState
from kvrelay.router.retry import RetryPolicy
from kvrelay.router.server import main as router_main


async def _until(cond, limit: float = 3.0) -> float:
    """Seconds until ``cond()`` holds (fails the test past ``limit``)."""
    t0 = time.monotonic()
    await await_until(cond, limit, "the router's state")
    return time.monotonic() - t0


def _sample(router, name, **labels):
    return router.metrics.registry.get_sample_value(name, labels)


@pytest.mark.timeout(60)
def test_retries_back_off_then_the_breaker_opens_after_n_failures_and_the_probe_closes_it():
    async def main():
        dec = Worker("decode", status=500)
        url_dec = await dec.start()
        steps = [0.02, 0.04, 0.08, 0.1, 0.1]  # base 20 ms, doubling, capped at 100 ms; jitter pinned to the cap
        retry = RetryPolicy(retries=5, backoff=0.02, backoff_max=0.1, jitter=lambda: 1.0)
        try:
            async def fn(router, session, url):
                async with session.post(url + "/v1/completions", json={"prompt": "hi"}) as r:
                    assert r.status == 500 and await r.json() == {"error": "boom"}  # the worker's own answer
                assert len(dec.bodies) == 6, "1 attempt + 5 retries"
                gaps = [b - a for a, b in zip(dec.times, dec.times[1:], strict=False)]
                assert all(g >= 0.9 * s for g, s in zip(gaps, steps, strict=True)), (gaps, steps)
                assert router.metrics.retries.labels("decode")._value.get() == 5
                w = router.decode.workers[0]
                assert w.healthy and w.breaker.consecutive == 6  # 500s count; 10 in a row open it
                dec.health_status = 503  # and it now fails its health checks too
                async with session.post(url + "/v1/completions", json={"prompt": "hi"}) as r:
                    body = await r.json()
                # the 10th failure in a row opened the breaker: no 11th attempt; the worker's last answer
                assert len(dec.bodies) == 10 and r.status == 500 and body == {"error": "boom"}
                assert w.breaker.state is BreakerState.OPEN and w.breaker.opened == 1
                assert _sample(router, "kvrelay_router_breaker_open", role="decode", worker=url_dec) == 1
                async with session.post(url + "/v1/completions", json={"prompt": "hi"}) as r:
                    assert r.status == 503 and len(dec.bodies) == 10  # skipped at once while open
                async with session.get(url + "/readyz") as r:
                    ready = await r.json()
                assert r.status == 503 and ready["breakers"]["decode"][0]["state"] == "open"
                checks = dec.health_checks
                await _until(lambda: dec.health_checks >= checks + 2)  # probed at the short interval
                assert w.breaker.state is BreakerState.OPEN
                dec.status = dec.health_status = 200  # it recovers
                t0 = time.monotonic()
                back = await _until(lambda: w.healthy)
                print(f"\nworker back in service {back:.3f}s after it answered health again")
                assert back < 1.0 + 0.5  # probe interval 0.2 s: within 1 s, with slack for a loaded machine
                assert w.breaker.state is BreakerState.HALF_OPEN
                async with session.post(url + "/v1/completions", json={"prompt": "hi"}) as r:
                    assert r.status == 200
                assert w.breaker.state is BreakerState.CLOSED and w.breaker.consecutive == 0
                assert _sample(router, "kvrelay_router_breaker_open", role="decode", worker=url_dec) == 0
                assert _sample(router, "kvrelay_router_breaker_opened_total", role="decode", worker=url_dec) == 1
                assert time.monotonic() - t0 < 3
            await with_router([], [url_dec], fn, retry=retry)
        finally:
            await dec.stop()
    asyncio.run(main())


@pytest.mark.timeout(60)
def test_a_dead_worker_is_out_at_once_and_back_within_a_second_of_its_return():
    async def main():
        a, b = Worker("decode"), Worker("decode")
        url_a, url_b = await a.start(), await b.start()
        try:
            async def fn(router, session, url):
                router.decode.policy = "round_robin"
                router.decode._rr = iter([0] * 100)  # always the first worker in service: A while it is
                wa = router.decode.workers[0]
                await a.stop()  # kill -9: connections refused
                async with session.post(url + "/v1/completions", json={"prompt": "hi"}) as r:
                    assert r.status == 200 and (await r.json())["choices"][0]["text"] == "decode"
                assert len(b.bodies) == 1
                assert not wa.healthy and wa.breaker.consecutive == 1, "a refused connection opens it at once"
                assert "ConnectFailed" in wa.last_error
                assert router.metrics.retries.labels("decode")._value.get() == 1
                for _ in range(3):  # while it is down nothing is sent to it
                    async with session.post(url + "/v1/completions", json={"prompt": "hi"}) as r:
                        assert r.status == 200
                assert len(b.bodies) == 4 and router.metrics.retries.labels("decode")._value.get() == 1
                await a.start()  # same port: the process is back
                back = await _until(lambda: wa.healthy)
                print(f"\ndead worker back in service {back:.3f}s after it listened again")
                assert back < 1.5  # probe every 0.2 s (the full health check here is hourly)
                async with session.post(url + "/v1/completions", json={"prompt": "hi"}) as r:
                    assert r.status == 200
                assert len(a.bodies) == 1 and wa.breaker.state is BreakerState.CLOSED
            await with_router([], [url_a, url_b], fn, health_interval=3600)
        finally:
            await a.stop()
            await b.stop()
    asyncio.run(main())


@pytest.mark.timeout(60)
def test_decode_dead_before_its_first_token_is_retried_with_the_same_ids_and_one_prefill():
    async def main():
        pre = Worker("prefill", params={"block_hashes": ["ab"]})
        d1 = Worker("decode", stream_chunks=3, die_after=0)  # SSE headers and half an event, then dies
        d2 = Worker("decode", stream_chunks=3)
        urls = [await w.start() for w in (pre, d1, d2)]
        try:
            async def fn(router, session, url):
                router.decode.policy = "round_robin"
                router.decode._rr = iter([0] * 100)
                async with session.post(url + "/v1/completions", json={"prompt": [1, 2], "stream": True}) as r:
                    raw = await r.read()
                assert r.status == 200 and raw == b"".join(d2._chunk(i) for i in range(3)) + b"data: [DONE]\n\n"
                assert len(d1.bodies) == len(d2.bodies) == 1 and len(pre.bodies) == 1
                rid = pre.bodies[0]["request_id"]
                assert d1.bodies[0] == d2.bodies[0], "the retry carries the same request"
                assert d2.bodies[0]["request_id"] == rid
                assert d2.bodies[0]["kv_transfer_params"] == {"do_remote_prefill": True, "kvrelay_request_id": rid}
                w1 = router.decode.workers[0].breaker
                assert w1.opened == 1, "a dropped connection takes it out at once (its probe brings it back)"
                # non-streaming: the worker drops the connection before answering, or halfway through its body
                for opened, mode in enumerate(("die_before", "cut_body"), start=2):
                    d1.die_after, d1.die_before, d1.cut_body = None, mode == "die_before", mode == "cut_body"
                    router.decode.workers[0].breaker.probe_ok()
                    async with session.post(url + "/v1/completions", json={"prompt": [1, 2]}) as r:
                        body = await r.json()
                    assert r.status == 200 and body["choices"][0]["text"] == "decode", mode
                    assert body["received"]["kv_transfer_params"]["do_remote_prefill"] is True
                    assert w1.opened == opened, mode
                assert len(d1.bodies) == 3 and len(d2.bodies) == 3 and len(pre.bodies) == 3
                assert router.metrics.retries.labels("decode")._value.get() == 3
            await with_router(urls[:1], urls[1:], fn)
        finally:
            for w in (pre, d1, d2):
                await w.stop()
    asyncio.run(main())


@pytest.mark.timeout(60)
def test_decode_dead_mid_stream_ends_with_an_error_event_the_openai_client_raises_on():
    async def main():
        dec = Worker("decode", stream_chunks=5, die_after=2)
        url_dec = await dec.start()
        try:
            async def fn(router, session, url):
                async with session.post(url + "/v1/completions", json={"prompt": "hi", "stream": True}) as r:
                    raw = await r.read()
                head = dec._chunk(0) + dec._chunk(1)  # the half event the worker wrote last is dropped
                assert raw.startswith(head) and raw.endswith(b"\n\ndata: [DONE]\n\n"), raw
                event = json.loads(raw[len(head):].split(b"\n\n")[0].removeprefix(b"data: "))
                assert event["error"]["code"] == 502 and "failed mid-stream" in event["error"]["message"]
                assert url_dec in event["error"]["message"]
                assert len(dec.bodies) == 1, "bytes reached the client: no retry"
                router.decode.workers[0].breaker.probe_ok()
                client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
                texts = []
                with pytest.raises(openai.APIError, match="failed mid-stream"):
                    stream = await client.completions.create(model="m", prompt="hi", stream=True)
                    async for chunk in stream:
                        texts.append(chunk.choices[0].text)
                await client.close()
                assert texts == ["t0 ", "t1 "]
                assert router.metrics.requests.labels("decode_failed_midstream")._value.get() == 2
                # not streaming: the answer is held until complete, so a cut one is a clean 502, never half a body
                dec.die_after, dec.cut_body = None, True
                router.decode.workers[0].breaker.probe_ok()
                async with session.post(url + "/v1/completions", json={"prompt": "hi"}) as r:
                    body = await r.json()
                assert r.status == 502 and body["error"]["code"] == 502, body
                assert "ConnectionClosed" in body["error"]["message"] and len(dec.bodies) == 3
            await with_router([], [url_dec], fn)
        finally:
            await dec.stop()
    asyncio.run(main())


@pytest.mark.timeout(60)
def test_a_client_that_leaves_mid_stream_does_not_count_against_the_worker():
    async def main():
        dec = Worker("decode", stream_chunks=100)
        dec.chunk_delay = 0.02
        url_dec = await dec.start()
        try:
            async def fn(router, session, url):
                async with session.post(url + "/v1/completions", json={"prompt": "hi", "stream": True}) as r:
                    assert (await r.content.readuntil(b"\n\n")) == dec._chunk(0)
                    r.close()  # the client goes away
                gone = router.metrics.requests.labels("client_gone")
                await _until(lambda: gone._value.get() == 1)
                w = router.decode.workers[0]
                assert w.breaker.consecutive == 0 and w.breaker.opened == 0 and w.in_flight == 0
                assert router.metrics.retries.labels("decode")._value.get() == 0
            await with_router([], [url_dec], fn)
        finally:
            await dec.stop()
    asyncio.run(main())


@pytest.mark.timeout(60)
def test_prefill_seconds_counts_only_answered_prefill_legs():
    async def main():
        pre = Worker("prefill", params={"block_hashes": []})
        dec = Worker("decode")
        urls = [await w.start() for w in (pre, dec)]
        hang = asyncio.Event()
        try:
            async def fn(router, session, url):
                count = "kvrelay_router_prefill_seconds_count"
                pre.wait_for = hang  # the decode answers first: the prefill leg is cancelled
                async with session.post(url + "/v1/completions", json={"prompt": "hi"}) as r:
                    assert r.status == 200
                await _until(lambda: len(pre.bodies) == 1)
                assert _sample(router, count) == 0
                slow = asyncio.Event()
                pre.wait_for, dec.wait_for = None, slow  # now the prefill answers first: it is counted

                async def request():
                    async with session.post(url + "/v1/completions", json={"prompt": "hi"}) as r:
                        return r.status
                answer = asyncio.create_task(request())
                await _until(lambda: _sample(router, count) == 1)
                slow.set()
                assert await answer == 200 and _sample(router, count) == 1
            await with_router(urls[:1], urls[1:], fn)
        finally:
            hang.set()
            for w in (pre, dec):
                await w.stop()
    asyncio.run(main())


def test_breaker_and_retry_policy_rules():
    b = Breaker("w", threshold=3)
    assert not b.failure("x") and not b.failure("x") and b.failure("x")  # the 3rd in a row opens it
    assert b.state is BreakerState.OPEN and not b.available and b.opened == 1
    b.probe_ok()
    assert b.state is BreakerState.HALF_OPEN and b.available
    assert b.failure("again"), "half-open: one failure re-opens it"
    b.probe_ok()
    b.success()
    assert b.state is BreakerState.CLOSED and b.consecutive == 0
    assert not b.failure("x") and b.failure("refused", fatal=True) and b.opened == 3
    c = Breaker("w", threshold=2)
    c.failure("x")
    c.success()
    assert not c.failure("x"), "only failures in a row count"
    with pytest.raises(ValueError, match="at least 1"):
        Breaker("w", threshold=0)
    p = RetryPolicy()
    assert (p.retries, p.backoff, p.backoff_max) == (5, 0.05, 1.0)
    for n, cap in ((1, 0.05), (2, 0.1), (5, 0.8), (6, 1.0), (30, 1.0)):
        delays = [p.delay(n) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays) and max(delays) > cap / 2, (n, cap)  # full jitter below the cap
    with pytest.raises(ValueError, match="--retries -1"):
        RetryPolicy(retries=-1)


def test_bad_router_flags_are_refused_with_the_flag_named(capsys):
    for argv, words in ((["--retries", "-1"], "--retries -1"), (["--breaker-failures", "0"], "--breaker-failures 0"),
                        (["--store", "127.0.0.1:5600"], "--store '127.0.0.1:5600'"),
                        (["--retry-backoff", "2"], "--retry-backoff 2"), (["--probe-interval", "0"], "--probe-interval")):
        assert router_main(["--decode", "http://127.0.0.1:1", *argv]) == 2
        assert words in capsys.readouterr().err
