"""Publish and pull across processes through a real daemon; waiting pulls; lookups; concurrency."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from childenv import child_env
from store_helpers import COMPAT, make_chunk, wait_for
from kvrelay.store.client import StoreClient, StoreError

WORKER = str(Path(__file__).parent / "store_worker.py")


def run_worker(*args, timeout: float = 60) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, WORKER, *map(str, args)], env=child_env())


@pytest.mark.timeout(60)
def test_publish_in_place_then_pull_byte_exact(daemon):
    with StoreClient(daemon.address, compat_hash=COMPAT) as c:
        k, h, d = make_chunk(1, 300_001)
        assert c.lookup([k]) == 0
        c.reserve("r1", [(k, h.nbytes)])
        buf = c.publish_buffer(k)
        assert buf.numel() == h.nbytes and buf.dtype == torch.uint8
        buf.copy_(d)
        c.commit(k, h)
        assert c.lookup([k]) == 1
        out = torch.zeros(h.nbytes, dtype=torch.uint8)
        assert c.pull(k, out, time.monotonic() + 5) == h
        assert torch.equal(out, d)
        # publish() without reserve, and a prefix lookup that stops at the first missing chunk
        k2, h2, d2 = make_chunk(2, 4096)
        c.publish(k2, h2, d2)
        k3, _, _ = make_chunk(3, 10)
        assert c.lookup([k, k2, k3, k]) == 2
        c.ping()  # hands back the pull's pin
        assert c.stats()["pins"] == 0


@pytest.mark.timeout(60)
def test_pull_waits_for_commit_without_polling(daemon):
    k, h, d = make_chunk(5, 65_536)
    result: dict = {}
    with StoreClient(daemon.address, compat_hash=COMPAT) as c:
        def puller():
            out = torch.empty(h.nbytes, dtype=torch.uint8)
            result["header"] = c.pull(k, out, time.monotonic() + 10)
            result["returned"] = time.monotonic()
            result["out"] = out
        parked = c.stats()["waiters"]
        t = threading.Thread(target=puller)
        t.start()
        wait_for(lambda: c.stats()["waiters"] == parked + 1, 10, "the pull parked in the daemon")
        c.reserve("r", [(k, h.nbytes)])
        # reserved but not committed: the daemon still holds the pull (it answers in order: the reserve first)
        assert c.stats()["waiters"] == parked + 1 and "header" not in result
        c.publish_buffer(k).copy_(d)
        committed = time.monotonic()
        c.commit(k, h)
        t.join(timeout=10)
        assert result["header"] == h and torch.equal(result["out"], d)
        assert result["returned"] > committed  # answered by the commit, not before


@pytest.mark.timeout(30)
def test_unknown_key_times_out_at_deadline(daemon):
    k, h, _ = make_chunk(6, 100)
    with StoreClient(daemon.address, compat_hash=COMPAT) as c:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="not ready within .*no publisher reserved it"):
            c.pull(k, torch.empty(100, dtype=torch.uint8), time.monotonic() + 0.4)
        assert 0.35 < time.monotonic() - t0 < 10
        # reserved but never committed: the timeout names the request that holds it (a stuck publisher)
        k2, h2, _ = make_chunk(60_606, 100)  # a key no other test of this module's daemon uses
        c.reserve("stuck-prefill", [(k2, h2.nbytes)])
        with pytest.raises(TimeoutError, match="reserved by request 'stuck-prefill', never committed"):
            c.pull(k2, torch.empty(100, dtype=torch.uint8), time.monotonic() + 0.3)
        c.release("stuck-prefill")  # the daemon is the module's: leave no reservation behind
        with pytest.raises(TimeoutError):
            c.wait_ready([k], time.monotonic() + 0.1)
        c.ping()  # still serving
        assert c.stats()["waiters"] == 0  # expired waiters are forgotten, not leaked


@pytest.mark.timeout(90)
def test_concurrent_publishers_and_pullers(daemon):
    """Two puller processes wait on chunks nobody has reserved yet; two publisher processes then fill them."""
    with StoreClient(daemon.address, compat_hash=COMPAT) as c:
        before = c.stats()
        procs = [run_worker("pull", daemon.address, "shm", 1000 + 50 * i, 12, 100_000) for i in range(2)]
        wait_for(lambda: c.stats()["waiters"] == 2, 60, "both pullers waiting")
        procs += [run_worker("publish", daemon.address, "shm", 1000 + 50 * i, 12, 100_000) for i in range(2)]
        assert [p.wait(timeout=80) for p in procs] == [0] * 4
        s = c.stats()
        assert s["memory_chunks"] - before["memory_chunks"] == 24 and s["reserved_chunks"] == 0
        assert s["commits"] - before.get("commits", 0) == 24


@pytest.mark.timeout(60)
def test_threads_share_one_client(daemon):
    chunks = [make_chunk(2000 + i, 50_000) for i in range(16)]
    errors: list[BaseException] = []
    with StoreClient(daemon.address, compat_hash=COMPAT) as c:
        def pull_all():
            out = torch.empty(50_000, dtype=torch.uint8)
            try:
                for k, _h, d in chunks:
                    c.pull(k, out, time.monotonic() + 10)
                    assert torch.equal(out, d)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
        threads = [threading.Thread(target=pull_all) for _ in range(3)]
        for t in threads:
            t.start()
        c.reserve("big", [(k, h.nbytes) for k, h, _ in chunks])
        for k, h, d in chunks:
            c.publish_buffer(k).copy_(d)
            c.commit(k, h)
        for t in threads:
            t.join(timeout=30)
        assert not errors
        c.ping()
        assert c.stats()["pins"] == 0  # every pull handed its pin back


@pytest.mark.timeout(60)
def test_republish_of_present_chunk_is_a_cache_hit(daemon):
    k, h, d = make_chunk(7, 5000)
    with StoreClient(daemon.address, compat_hash=COMPAT) as c:
        c.publish(k, h, d)
        c.reserve("again", [(k, h.nbytes)])
        buf = c.publish_buffer(k)  # scratch: the store already has it
        buf.fill_(0)
        c.commit(k, h)
        out = torch.empty(5000, dtype=torch.uint8)
        c.pull(k, out, time.monotonic() + 2)
        assert torch.equal(out, d)
        with StoreClient(daemon.address, compat_hash="another-model") as other:
            ko, ho, do = make_chunk(8, 5000, compat="another-model")
            other.publish(ko, ho, do)
            assert other.purge(namespace="another-model") == 1  # a tenant's purge leaves the others alone
            assert c.lookup([ko]) == 0 and c.lookup([k]) == 1
        assert c.purge(prefix=k.block_hash) == 1
        assert c.lookup([k]) == 0
        with pytest.raises(StoreError, match="not reserved"):
            c.publish_buffer(k)
        # delete by key: only the named chunk goes; a leased one stays until its lease is released
        (k1, h1, d1), (k2, h2, d2) = make_chunk(9, 3000), make_chunk(10, 3000)
        c.publish(k1, h1, d1)
        c.publish(k2, h2, d2)
        c.lease([k2], ttl=30)
        assert c.delete([k1, k2, make_chunk(11, 10)[0]]) == 1  # k2 leased, the third never stored
        assert c.lookup([k1]) == 0 and c.lookup([k2]) == 1
        c.release([k2])
        assert c.delete([k2]) == 1 and c.lookup([k2]) == 0


@pytest.mark.timeout(60)
def test_pull_many_one_round_trip_waits_verifies_and_unpins(daemon):
    chunks = [make_chunk(900 + i, n) for i, n in enumerate((4096, 1 << 20, 3 << 20, 77))]
    with StoreClient(daemon.address, compat_hash=COMPAT) as c:
        result: dict = {}

        def puller():
            outs = [torch.empty(h.nbytes + 5, dtype=torch.uint8) for _, h, _ in chunks]
            try:
                result["headers"] = c.pull_many([k for k, _, _ in chunks], outs, time.monotonic() + 10)
                result["outs"] = outs
            except BaseException as exc:  # noqa: BLE001
                result["error"] = exc
        parked = c.stats()["waiters"]
        t = threading.Thread(target=puller)
        t.start()
        wait_for(lambda: c.stats()["waiters"] == parked + 1, 10, "the pull_many parked in the daemon")
        c.reserve("many", [(k, h.nbytes) for k, h, _ in chunks])
        for k, h, d in chunks[:-1]:
            c.publish_buffer(k).copy_(d)
            c.commit(k, h)
        # waits for ALL the keys: parked again on the last one (the daemon answers the stats after the commits)
        assert c.stats()["waiters"] == parked + 1 and not result
        k, h, d = chunks[-1]
        c.publish_buffer(k).copy_(d)
        c.commit(k, h)
        t.join(timeout=10)
        assert "error" not in result, result.get("error")
        assert result["headers"] == [h for _, h, _ in chunks]
        for out, (_, h, d) in zip(result["outs"], chunks, strict=True):
            assert torch.equal(out[:h.nbytes], d)
        assert c.pull_many([], [], time.monotonic() + 1) == []
        c.ping()  # hands back the pins
        assert c.stats()["pins"] == 0
        # a byte flipped in the pool after commit: the receiver's end-to-end verify catches it
        k, h, d = chunks[2]
        s = c._call(__import__("kvrelay.store.protocol", fromlist=["Pull"]).Pull(key=k, timeout=1)).slots[0]
        c._unpin.append(s.pin)
        c._path.tensor[s.offset + 12345] ^= 0xFF
        outs = [torch.empty(h.nbytes, dtype=torch.uint8) for _, h, _ in chunks]
        with pytest.raises(StoreError, match="checksum") as ei:
            c.pull_many([k for k, _, _ in chunks], outs, time.monotonic() + 5)
        assert ei.value.code == "corrupt"
        c._path.tensor[s.offset + 12345] ^= 0xFF
        # a missing key: a timeout at the deadline that names it, nothing left pinned
        missing, _, _ = make_chunk(999, 10)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="not ready within"):
            c.pull_many([chunks[0][0], missing], [outs[0], torch.empty(10, dtype=torch.uint8)],
                        time.monotonic() + 0.4)
        assert 0.35 < time.monotonic() - t0 < 10
        with pytest.raises(ValueError, match="2 keys but 1"):
            c.pull_many([chunks[0][0], missing], [outs[0]], time.monotonic() + 1)
        c.ping()
        assert c.stats()["pins"] == 0


@pytest.mark.timeout(60)
def test_abort_fails_parked_and_later_pulls_of_that_request_at_once(daemon):
    (k, h, d), (k2, _, _) = make_chunk(1201, 1000), make_chunk(1202, 1000)
    with StoreClient(daemon.address, compat_hash=COMPAT) as c, \
            StoreClient(daemon.address, compat_hash=COMPAT) as publisher:
        got: dict = {}

        def waiter() -> None:
            t0 = time.monotonic()
            try:
                c.pull_many([k, k2], [torch.empty(1000, dtype=torch.uint8),
                            torch.empty(1000, dtype=torch.uint8)], time.monotonic() + 30, request_id="req-a")
            except StoreError as exc:
                got["exc"], got["after"] = exc, time.monotonic() - t0
        parked = publisher.stats()["waiters"]
        t = threading.Thread(target=waiter)
        t.start()
        wait_for(lambda: publisher.stats()["waiters"] == parked + 1, 10, "the pull_many parked in the daemon")
        assert publisher.abort("req-a", "the store refused the prefill's reservation") == 1
        t.join(10)
        assert got["exc"].code == "aborted" and "refused the prefill" in str(got["exc"]) and got["after"] < 10
        with pytest.raises(StoreError, match="aborted"):  # a pull that arrives later fails at once too
            c.pull(k, torch.empty(1000, dtype=torch.uint8), time.monotonic() + 30, request_id="req-a")
        publisher.publish(k, h, d)  # other requests (or none) for the same content are unaffected
        out = torch.empty(1000, dtype=torch.uint8)
        assert c.pull(k, out, time.monotonic() + 5, request_id="req-b") == h and torch.equal(out, d)
        with pytest.raises(StoreError, match="request_id"):
            publisher.abort("", "no id")
        assert c.stats()["aborts"] == 1


@pytest.mark.timeout(60)
def test_a_pull_of_chunks_its_request_never_reserved_fails_at_once(daemon):
    """A decode pulls its prompt under the request id the prefill published another prompt under: the store
    fails the pull at once (MISMATCH) instead of letting it wait its deadline, whether the pull arrives after
    the reservation or is parked before it; a pull sharing any chunk with the reservation still waits."""
    (k, h, d), (other, ho, _), (k2, _, _) = make_chunk(1301, 1000), make_chunk(1302, 1000), make_chunk(1303, 1000)
    buf = [torch.empty(1000, dtype=torch.uint8) for _ in range(2)]
    with StoreClient(daemon.address, compat_hash=COMPAT) as c, \
            StoreClient(daemon.address, compat_hash=COMPAT) as publisher:
        mism0 = c.stats()["mismatches"]
        publisher.reserve("req-m", [(other, ho.nbytes)])
        t0 = time.monotonic()
        with pytest.raises(StoreError, match="another prompt") as exc:
            c.pull(k, buf[0], time.monotonic() + 30, request_id="req-m")
        assert exc.value.code == "mismatch" and time.monotonic() - t0 < 10
        # parked first (the prefill had not reserved yet), failed by the reservation that follows
        got: dict = {}

        def waiter() -> None:
            t0 = time.monotonic()
            try:
                c.pull_many([k, k2], buf, time.monotonic() + 30, request_id="req-n")
            except StoreError as e:
                got["exc"], got["after"] = e, time.monotonic() - t0
        parked = publisher.stats()["waiters"]
        t = threading.Thread(target=waiter)
        t.start()
        wait_for(lambda: publisher.stats()["waiters"] == parked + 1, 10, "the pull_many parked in the daemon")
        publisher.reserve("req-n", [(other, ho.nbytes)])
        t.join(10)
        assert got["exc"].code == "mismatch" and got["after"] < 10
        assert c.stats()["mismatches"] == mism0 + 2
        # one chunk in common with what the request reserved: the pull waits for it, and gets it
        publisher.reserve("req-o", [(k, h.nbytes)])
        done = threading.Event()

        def served() -> None:
            assert c.pull(k, buf[0], time.monotonic() + 30, request_id="req-o") == h
            done.set()
        t = threading.Thread(target=served)
        t.start()
        wait_for(lambda: publisher.stats()["waiters"] == parked + 1, 10, "the same-prompt pull parked")
        publisher.publish(k, h, d)
        t.join(10)
        assert done.is_set() and torch.equal(buf[0], d)
