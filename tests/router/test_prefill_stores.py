"""A store on every host, the router's side (issue 23): each decode leg names (in its signed params) the store
its prefill publishes into; a prefill leg's retries stay on that store's workers; while a prefill's store
does not answer pings the router sends its requests to the other prefills (and to the decode alone when
none is left), and resumes once it answers.  Fake workers and fake stores answering the store protocol's
Ping on 127.0.0.1 (router_fakes.py); the engines' side is tested in tests/connector/test_peer_stores.py."""

import asyncio
import time

import pytest
from router_fakes import FakeStore, Worker, with_router
from waiting import await_until

from kvrelay.params import STORE_ADDRESS
from kvrelay.router.config import RouterConfig
from kvrelay.router.retry import RetryPolicy
from kvrelay.router.server import build_parser, config_of
from kvrelay.router.store import PrefillStores, parse_prefill_stores

P1, P2 = "http://127.0.0.1:8101", "http://127.0.0.1:8102"
S1, S2 = "tcp://127.0.0.1:5601", "tcp://127.0.0.1:5602"


def test_prefill_store_flags_map_each_prefill_to_its_store():
    args = build_parser().parse_args(["--decode", "http://127.0.0.1:8200", "--prefill", P1, "--prefill", P2 + "/",
                                      "--prefill-store", f"{P1}={S1}", "--prefill-store", f"{P2}/={S2}"])
    config = config_of(args)
    assert parse_prefill_stores(config.prefill_stores, config.prefill) == {P1: S1, P2: S2}
    stores = PrefillStores.of(config.prefill_stores, config.prefill, 2.0, 0.2)
    assert stores is not None and stores.address_of(P2 + "/") == S2 and sorted(stores.watches) == [S1, S2]
    assert stores.others(P1, [P1, P2]) == {P2}
    assert PrefillStores.of((), config.prefill, 2.0, 0.2) is None  # one store for the cluster: --store


@pytest.mark.parametrize("flags,message", [
    ([f"{P1}"], "give URL=ADDR"),
    ([f"http://127.0.0.1:9999={S1}"], "http://127.0.0.1:9999 is not a --prefill URL"),
    ([f"{P1}=http://127.0.0.1:5600", f"{P2}={S2}"], "is not a store's control address"),
    ([f"{P1}={S1}", f"{P1}={S2}"], f"{P1} has a store already ({S1})"),
    ([f"{P1}={S1}"], f"no store for --prefill {P2}: give every prefill worker the store it publishes into"),
])
def test_bad_prefill_store_flags_are_named(flags, message):
    with pytest.raises(ValueError) as err:
        RouterConfig(decode=("http://127.0.0.1:8200",), prefill=(P1, P2), prefill_stores=tuple(flags))
    assert message in str(err.value), str(err.value)


async def _until(cond, limit: float = 3.0) -> None:
    await await_until(cond, limit, "the router's view of the stores")


@pytest.mark.timeout(60)
def test_decode_legs_name_their_prefills_store_and_a_dead_store_is_passed_over():
    async def main():
        s1, s2 = FakeStore(), FakeStore()
        for s in (s1, s2):
            await s.start()
        p1, p2 = Worker("prefill", params={"block_hashes": []}), Worker("prefill", params={"block_hashes": []})
        dec = Worker("decode")
        u1, u2, ud = [await w.start() for w in (p1, p2, dec)]
        stores = PrefillStores({u1: s1.address, u2: s2.address}, timeout=0.3, interval=0.3, probe_interval=0.2)
        try:
            async def fn(router, session, url):
                async def ask() -> dict:
                    async with session.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}) as r:
                        assert r.status == 200
                        return (await r.json())["received"]

                named: dict[str, int] = {}
                p1.delay = p2.delay = 0.2  # four requests at once: least_loaded spreads them over both prefills
                for got in await asyncio.gather(*(ask() for _ in range(4))):
                    kvp = got["kv_transfer_params"]
                    assert kvp["do_remote_prefill"] is True
                    named[kvp[STORE_ADDRESS]] = named.get(kvp[STORE_ADDRESS], 0) + 1
                await _until(lambda: len(p1.bodies) + len(p2.bodies) == 4)
                assert len(p1.bodies) == named[s1.address] and len(p2.bodies) == named[s2.address]
                assert named[s1.address] >= 1 and named[s2.address] >= 1
                await s1.stop()  # host 1's store dies
                await _until(lambda: not stores.up(u1))
                before = len(p1.bodies)
                for _ in range(4):
                    got = await ask()
                    assert got["kv_transfer_params"][STORE_ADDRESS] == s2.address
                await asyncio.sleep(0)
                assert len(p1.bodies) == before, "a prefill whose store is down got requests"
                await s2.stop()  # no store left: the decode alone computes
                await _until(lambda: not stores.up(u2))
                got = await ask()
                assert got == {"prompt": "hi", "max_tokens": 3}
                sample = router.metrics.registry.get_sample_value
                assert sample("kvrelay_router_routes_total", {"route": "decode_only_store_down"}) == 1
                for s in (s1, s2):  # each store's breaker, open
                    assert sample("kvrelay_router_breaker_open", {"role": "store", "worker": s.address}) == 1
                    assert sample("kvrelay_router_breaker_opened_total", {"role": "store", "worker": s.address}) == 1
                async with session.get(url + "/readyz") as r:
                    ready = await r.json()
                assert {s["address"]: s["up"] for s in ready["stores"]} == {s1.address: False, s2.address: False}
                await s1.start()  # back: hinted at again
                t0 = time.monotonic()
                await _until(lambda: stores.up(u1))
                assert time.monotonic() - t0 < 1.5
                got = await ask()
                assert got["kv_transfer_params"][STORE_ADDRESS] == s1.address
            await with_router([u1, u2], [ud], fn, stores=stores)
        finally:
            for s in (s1, s2):
                await s.stop()
            for w in (p1, p2, dec):
                await w.stop()
    asyncio.run(main())


@pytest.mark.timeout(60)
def test_a_prefill_legs_retries_stay_on_its_store():
    async def main():
        bad = Worker("prefill", status=500)  # fails every attempt
        same = Worker("prefill", params={"block_hashes": []})  # same host (store) as bad
        far = Worker("prefill", params={"block_hashes": []})  # another host's store
        dec = Worker("decode")
        ub, us, uf, ud = [await w.start() for w in (bad, same, far, dec)]
        stores = PrefillStores({ub: S1, us: S1, uf: S2})
        try:
            async def fn(router, session, url):
                from kvrelay.router.policy import Decision
                decision = Decision("pd", router.decode.workers[0], router.prefill.workers[0], True)
                assert decision.prefill.url == ub
                for _ in range(3):
                    ok = await router.legs.prefill("/v1/completions", {"request_id": "r", "prompt": "hi"},
                                                   first=decision.prefill)
                    assert ok
                assert len(far.bodies) == 0 and len(same.bodies) == 3, "a retry went to another store's prefill"
                params = router.legs.decode_params({"do_remote_prefill": True}, decision.prefill)
                assert params[STORE_ADDRESS] == S1
            await with_router([ub, us, uf], [ud], fn, stores=stores, retry=RetryPolicy(3, 0.001, 0.002))
        finally:
            for w in (bad, same, far, dec):
                await w.stop()
    asyncio.run(main())
