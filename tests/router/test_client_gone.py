"""A client that disconnects before its first token ends both legs at once (issue 26): the router, served as
`kvrelay router` serves it (`kvrelay.serving.start_serving`: aiohttp's handler_cancellation), notices the
disconnect while it waits for the decode worker, counts ``client_gone``, and closes the prefill leg too, so
the prefill worker sees its request closed (a real engine then aborts it and releases what it holds in the
store) instead of running to the end for no one.  Without handler_cancellation the router notices only
when it writes the first token (here: never, within the test's bound) and this test fails.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from router_fakes import Worker, with_router
from waiting import await_until

WITHIN_S = 2.0  # the workers below would hold the request for 10 s


@pytest.mark.timeout(60)
def test_client_gone_before_first_token_closes_both_legs():
    async def main():
        pre = Worker("prefill", params={"request_id": "r", "block_hashes": ["ab"]})
        dec = Worker("decode", stream_chunks=3)
        gates = [asyncio.Event(), asyncio.Event()]  # set only once the checks are done
        pre.wait_for = gates[0]  # the prefill is still computing
        dec.wait_for = gates[1]  # the decode waits for the prefill's KV, as on the store
        urls = [await w.start() for w in (pre, dec)]
        try:
            async def fn(router, session, url):
                try:
                    await check(router, url)
                finally:  # a failed check must not leave the router's handler waiting on the workers
                    for gate in gates:
                        gate.set()

            async def check(router, url):
                gone = router.metrics.requests.labels("client_gone")
                async with aiohttp.ClientSession() as client:  # the client's own connection, closed below
                    task = asyncio.create_task(client.post(url + "/v1/completions",
                                                           json={"prompt": [1, 2, 3], "max_tokens": 8,
                                                                 "stream": True}))
                    await await_until(lambda: pre.received.is_set() and dec.received.is_set(), 10,
                                      "both legs reached their workers")
                    task.cancel()  # the client gives up before any token: its connection closes
                    with pytest.raises(asyncio.CancelledError):
                        await task
                await await_until(lambda: gone._value.get() == 1, WITHIN_S, "the router counted client_gone")
                await await_until(lambda: pre.closed == 1, WITHIN_S, "the prefill worker saw its request closed")
                await await_until(lambda: dec.closed == 1, WITHIN_S, "the decode worker saw its request closed")
                assert pre.active == dec.active == 0
                assert router.metrics.retries.labels("decode")._value.get() == 0  # a client gone is not retried
                assert router.metrics.retries.labels("prefill")._value.get() == 0
            await with_router(urls[:1], urls[1:], fn)
        finally:
            for w in (pre, dec):
                await w.stop()
    asyncio.run(main())
