"""Membership on a real etcd: register, list, watch; a lease that expires drops its member; etcd killed and
restarted (same data dir, or a fresh one) brings the registration back, while a watcher keeps the last
membership it knew."""

from __future__ import annotations

import asyncio

import pytest

from kvrelay.membership import EtcdClient, EtcdError, Member, MembershipView, Registration
from kvrelay.membership.etcd import prefix_end
from kvrelay.membership.member import decode_member
from waiting import await_until

def member(name: str, kind: str = "decode", cluster: str = "c1", port: int = 9000) -> Member:
    return Member(kind=kind, name=name, address=f"http://127.0.0.1:{port}", attributes={"transport": "shm"},
                  cluster=cluster)


def names(view: MembershipView) -> set[str]:
    return {m.name for m in view.members.values()}


@pytest.mark.slow  # starts an etcd process
def test_register_list_watch_and_revoke(etcd):
    async def main() -> None:
        view = MembershipView(etcd.url, "c1")
        view.start()
        await await_until(view.listed.is_set, 10, "the first list")
        assert view.members == {} and view.connected
        a = Registration(etcd.url, member("a", "prefill", port=9001), ttl=5)
        b = Registration(etcd.url, member("b", "decode", port=9002), ttl=5)
        other = Registration(etcd.url, member("x", cluster="c2"), ttl=5)  # another cluster: not seen
        for r in (a, b, other):
            r.start()
        await await_until(lambda: names(view) == {"a", "b"}, 10, "both members watched")
        assert [m.address for m in view.of_kind("prefill")] == ["http://127.0.0.1:9001"]
        assert view.of_kind("decode")[0] == member("b", "decode", port=9002)
        assert set((await view.list_once()).keys()) == {a.member.key, b.member.key}
        await b.stop()  # revoked: the key goes at once, not a TTL later
        await await_until(lambda: names(view) == {"a"}, 3, "b gone on revoke")
        assert view.relists == 0  # all of it through one watch
        for r in (a, other):
            await r.stop()
        await view.stop()
    asyncio.run(main())


@pytest.mark.slow  # starts an etcd process
def test_lease_expiry_drops_a_member(etcd):
    async def main() -> None:
        view = MembershipView(etcd.url, "c1")
        view.start()
        reg = Registration(etcd.url, member("short"), ttl=2)
        reg.start()
        await await_until(lambda: names(view) == {"short"}, 10, "registered")
        # the process stops renewing without revoking (as a kill -9 would): etcd drops it within its TTL
        await reg.stop(revoke=False)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await await_until(lambda: names(view) == set(), 8, "member dropped on lease expiry")
        assert loop.time() - t0 < 2 + 2.5  # the TTL, plus etcd's expiry check
        await view.stop()
    asyncio.run(main())


@pytest.mark.slow  # starts an etcd process
@pytest.mark.parametrize("fresh", [False, True], ids=["same-data-dir", "fresh-data-dir"])
def test_etcd_killed_and_restarted(etcd, fresh):
    async def main() -> None:
        view = MembershipView(etcd.url, "c1")
        view.start()
        reg = Registration(etcd.url, member("d1"), ttl=3)
        reg.start()
        await await_until(lambda: names(view) == {"d1"} and reg.registered.is_set(), 10, "registered")
        etcd.kill()
        await await_until(lambda: not view.connected and not reg.registered.is_set(), 10,
                          "both noticed etcd is gone")
        # meanwhile: the last membership holds, longer than the lease
        assert names(view) == {"d1"}
        await asyncio.to_thread(etcd.start, fresh)
        await await_until(lambda: view.connected and reg.registered.is_set(), 15, "both back on etcd")
        await await_until(lambda: names(view) == {"d1"} and view.relists >= 1, 10, "listed again after the gap")
        client = EtcdClient(etcd.url)
        kvs, _ = await client.range_prefix(reg.member.key)
        assert [decode_member(kv.value) for kv in kvs] == [reg.member]
        if fresh:
            assert reg.registrations == 2  # a fresh etcd knows no lease: granted and put again
        await client.close()
        # a change made after the restart reaches the view through its new watch
        late = Registration(etcd.url, member("d2"), ttl=3)
        late.start()
        await await_until(lambda: names(view) == {"d1", "d2"}, 10, "a member registered after the restart")
        for r in (reg, late):
            await r.stop()
        await view.stop()
    asyncio.run(main())


@pytest.mark.slow  # starts an etcd process
def test_registration_waits_for_etcd_to_come_up(tmp_path):
    from etcd_helpers import EtcdProcess
    server = EtcdProcess(tmp_path)  # not started yet

    async def main() -> None:
        reg = Registration(server.url, member("early"), ttl=3)
        reg.start()
        view = MembershipView(server.url, "c1")
        view.start()
        await await_until(lambda: reg.failures >= 2 and view.failures >= 2, 10, "both retrying a closed port")
        assert not reg.registered.is_set() and not view.connected and view.members == {}
        await asyncio.to_thread(server.start)
        await await_until(lambda: names(view) == {"early"}, 15, "registered once etcd came up")
        await reg.stop()
        await view.stop()
    try:
        asyncio.run(main())
    finally:
        server.kill()


def test_client_errors_name_the_endpoint_and_bad_values():
    async def main() -> None:
        from kvrelay.httpjson import free_port
        client = EtcdClient(f"http://127.0.0.1:{free_port()}", timeout=1)
        with pytest.raises(EtcdError, match="did not answer /v3/kv/range"):
            await client.range_prefix(b"/x/")
        assert not await client.health()
        await client.close()
    asyncio.run(main())
    for bad, why in (("127.0.0.1:2379", "scheme must be http"), ("http://198.18.0.1:2379", "not on loopback"),
                     ("http://127.0.0.1", "no port"), ("http://h:1/v3", "nothing may follow")):
        with pytest.raises(ValueError, match=why):
            EtcdClient(bad)
    with pytest.raises(ValueError, match="member kind 'cache'"):
        Member(kind="cache", name="a", address="http://h:1")
    with pytest.raises(ValueError, match="member name"):
        Member(kind="decode", name="a/b", address="http://h:1")
    assert decode_member(b'{"kind": "nope", "name": "a", "address": "http://h:1"}') is None
    assert prefix_end(b"/a/") == b"/a0" and prefix_end(b"a\xff") == b"b"


@pytest.mark.slow  # starts an etcd process
def test_hung_etcd_is_noticed_and_the_last_membership_holds(etcd):
    """etcd stopped (SIGSTOP: its sockets stay open, so a quiet watch alone cannot tell) is noticed by the
    view's periodic list and by the lease renewals; the last membership holds, and all resumes on SIGCONT."""
    import signal

    async def main() -> None:
        view = MembershipView(etcd.url, "c1", check_interval=0.5)
        view.start()
        reg = Registration(etcd.url, member("h1"), ttl=3)
        reg.start()
        await await_until(lambda: names(view) == {"h1"} and reg.registered.is_set(), 10, "registered")
        etcd.child.signal(signal.SIGSTOP)
        try:
            await await_until(lambda: not view.connected and not reg.registered.is_set(), 10,
                              "a hung etcd noticed")
            assert names(view) == {"h1"}
        finally:
            etcd.child.signal(signal.SIGCONT)
        await await_until(lambda: view.connected and reg.registered.is_set(), 15, "both back on etcd")
        late = Registration(etcd.url, member("h2"), ttl=3)
        late.start()
        await await_until(lambda: names(view) == {"h1", "h2"}, 10, "a member registered after")
        for r in (reg, late):
            await r.stop()
        await view.stop()
    asyncio.run(main())


class DeafView(MembershipView):
    """A view whose watch stream stays open but delivers nothing (as one that died silently would): only the
    periodic list can bring its members up to date."""

    async def _watch(self, revision: int) -> None:
        async for _ in self.client.watch_prefix(self.prefix, revision):
            pass


@pytest.mark.slow  # starts an etcd process
def test_a_watch_that_delivers_nothing_is_caught_up_by_the_periodic_list(etcd):
    async def main() -> None:
        view = DeafView(etcd.url, "c1", check_interval=0.3)
        view.start()
        await await_until(view.listed.is_set, 10, "listed")
        reg = Registration(etcd.url, member("q1"), ttl=3)
        reg.start()
        await await_until(lambda: names(view) == {"q1"}, 5, "the member, through the periodic list")
        assert view.relists >= 1
        await reg.stop()
        await await_until(lambda: names(view) == set(), 5, "its removal, through the periodic list")
        await view.stop()
    asyncio.run(main())
