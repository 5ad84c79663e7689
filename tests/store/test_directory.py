"""The shared directory of ready chunks (store/directory.py): same-host pulls with no round trip.

Units: the seqlock rows (a row rewritten during a read invalidates it), probe limits, liveness.
Against a real daemon: pulls go through the directory and are reported (LRU, counters); a chunk deleted
or evicted is never served from a stale row; a killed daemon's directory is not used; --no-directory.
"""

from __future__ import annotations

import time
import urllib.request

import pytest
import torch

from store_helpers import COMPAT, make_chunk, metric, wait_for
from kvrelay.keys import kid_of
from kvrelay.store import directory as D
from kvrelay.store.client import StoreClient, StoreError
from kvrelay.transfer.wire import ChunkHeader


def _header(n: int = 4096) -> ChunkHeader:
    return ChunkHeader(compat_hash=COMPAT, layer=0, token_start=0, token_end=16, head_start=0, head_end=8,
                       dtype="uint8", nbytes=n, checksum=7)


POOL = (1, 2)  # (st_dev, st_ino) of the pool segment the rows point into


@pytest.fixture
def directory():
    name = f"kvrelay-test-dir-{time.monotonic_ns()}"
    d = D.Directory(name, 1024, POOL)
    r = D.DirectoryReader(d.name, d.slots, POOL)
    yield d, r
    r.close()
    d.close()


def test_rows_are_a_seqlock(directory):
    d, r = directory
    d.put("a:0:0:8", 8192, 4096, _header())
    row, seq, offset, header = r.find("a:0:0:8")
    assert (offset, header) == (8192, _header()) and r.still(row, seq)
    assert r.find("b:0:0:8") is None
    d.drop("a:0:0:8")  # evicted while a reader copies: its copy is thrown away
    assert not r.still(row, seq) and r.find("a:0:0:8") is None
    d.put("b:0:0:8", 8192, 4096, _header())  # the row (and the pool range) taken by another chunk
    assert not r.still(row, seq)
    d.put("a:0:0:8", 0, 4096, _header())  # back, elsewhere: a fresh row, a fresh seq
    assert r.find("a:0:0:8")[2] == 0 and r.find("b:0:0:8")[2] == 8192


def test_a_full_probe_window_is_a_miss_not_a_wrong_answer(directory, monkeypatch):
    d, r = directory
    home = D.key_hash("k-0")[0] & (d.slots - 1)
    kids = []
    i = 0
    while len(kids) < D.MAX_PROBE + 3:  # ids whose rows all start at one home row
        kid = f"k-{i}"
        i += 1
        if D.key_hash(kid)[0] & (d.slots - 1) == home:
            kids.append(kid)
    for j, kid in enumerate(kids):
        d.put(kid, j * 4096, 4096, _header())
    assert d.full == 3
    for j, kid in enumerate(kids):
        got = r.find(kid)
        assert (got is None) if j >= D.MAX_PROBE else got[2] == j * 4096
    d.drop(kids[0])  # the rest of the run shifts back: every row still found, and there is room again
    for j, kid in enumerate(kids[1:D.MAX_PROBE], 1):
        assert r.find(kid)[2] == j * 4096
    d.put(kids[-1], 99 * 4096, 4096, _header())
    assert r.find(kids[-1])[2] == 99 * 4096
    for kid in kids[1:D.MAX_PROBE]:  # empty again: a miss stops at the first empty row
        d.drop(kid)
    d.drop(kids[-1])
    assert not d.where and not d.kid_at and not d.rows[:, 1].any()


def test_deletes_keep_every_remaining_chunk_findable(directory):
    """Random puts and drops (backward-shift deletes across wrapping runs): the table always answers
    exactly the chunks that are in it."""
    import random
    d, r = directory
    rng = random.Random(5)
    live: dict[str, int] = {}
    for step in range(6000):
        kid = f"c{rng.randrange(1500)}"
        if kid in live and rng.random() < 0.5:
            d.drop(kid)
            del live[kid]
        else:
            d.put(kid, step * 4096, 4096, _header())
            if kid in d.where:
                live[kid] = step * 4096
            else:
                live.pop(kid, None)
        if step % 500 == 0:
            d.beat()  # as the daemon's loop does: on a loaded machine 500 steps can outlast STALE_S
            for k, off in live.items():
                assert r.find(k)[2] == off, k
    d.beat()
    for k, off in live.items():
        assert r.find(k)[2] == off
    assert all(r.find(f"c{i}") is None for i in range(1500) if f"c{i}" not in live)


def test_a_stale_or_replaced_directory_is_not_read(directory):
    d, r = directory
    d.put("a:0:0:8", 0, 4096, _header())
    assert r.find("a:0:0:8") is not None
    d.head[1] = time.monotonic_ns() - int(2 * D.STALE_S * 1e9)  # the daemon stopped beating (killed)
    assert r.find("a:0:0:8") is None
    d.beat()
    assert r.find("a:0:0:8") is not None
    d2 = D.Directory(d.name[:-len(D.SUFFIX)], 1024, POOL)  # a restarted daemon: a new file at the same path
    try:
        assert r.find("a:0:0:8") is None
        with pytest.raises(ValueError, match="another pool"):  # mapped the old pool, then the new directory
            D.DirectoryReader(d2.name, d2.slots, (1, 3))
    finally:
        d2.close()


@pytest.mark.timeout(60)
def test_pulls_go_through_the_directory_and_are_reported(daemon_factory):
    d = daemon_factory(pool_size="4MiB", max_chunk_bytes="1MiB")
    chunks = [make_chunk(900 + i, 1 << 20) for i in range(3)]
    with StoreClient(d.address, compat_hash=COMPAT) as c:
        assert c.info["directory"]["slots"] > 0 and c._path.directory is not None
        for k, h, data in chunks:
            c.publish(k, h, data)
        out = torch.empty(1 << 20, dtype=torch.uint8)
        before = c.stats()
        for k, h, data in chunks:
            assert c.pull(k, out, time.monotonic() + 5) == h and torch.equal(out, data)
        outs = [torch.empty(1 << 20, dtype=torch.uint8) for _ in chunks]
        assert c.pull_many([k for k, _, _ in chunks], outs, time.monotonic() + 5) == [h for _, h, _ in chunks]
        assert all(torch.equal(o, data) for o, (_, _, data) in zip(outs, chunks, strict=True))
        s = c.stats()  # carries the reports
        assert s["local_pulls"] - before["local_pulls"] == 6 and s["pulls"] - before["pulls"] == 6
        assert s["pins"] == 0 and s["directory_chunks"] == 3
        text = urllib.request.urlopen(d.metrics_url + "/metrics", timeout=5).read().decode()
        assert metric(text, "kvrelay_store_directory_pulls_total") == 6
        assert metric(text, "kvrelay_store_pulls_total") == 6


@pytest.mark.timeout(60)
def test_a_directory_pull_moves_the_chunk_up_the_lru(daemon_factory):
    """Pool of 4 chunks: A..D stored, A pulled through the directory, E stored: B goes, not A."""
    d = daemon_factory(pool_size="4MiB", max_chunk_bytes="1MiB")
    a, b, c_, dd, e = (make_chunk(950 + i, 1 << 20) for i in range(5))
    with StoreClient(d.address, compat_hash=COMPAT) as c:
        for k, h, data in (a, b, c_, dd):
            c.publish(k, h, data)
        out = torch.empty(1 << 20, dtype=torch.uint8)
        c.pull(a[0], out, time.monotonic() + 5)
        assert c.stats()["local_pulls"] == 1
        c.publish(*e)
        assert c.lookup([a[0]]) == 1 and c.lookup([b[0]]) == 0


@pytest.mark.timeout(60)
def test_a_deleted_chunk_is_never_served_from_its_old_row(daemon_factory):
    d = daemon_factory(pool_size="8MiB", max_chunk_bytes="1MiB")
    (k, h, data), (k2, h2, data2) = make_chunk(970, 1 << 20), make_chunk(971, 1 << 20)
    with StoreClient(d.address, compat_hash=COMPAT) as c, StoreClient(d.address, compat_hash=COMPAT) as other:
        c.publish(k, h, data)
        reader = c._path.directory
        row, seq, offset, _ = reader.find(kid_of(k))
        assert other.delete([k]) == 1
        assert not reader.still(row, seq)  # a copy begun before the delete is thrown away
        other.publish(k2, h2, data2)  # likely in the freed range
        out = torch.empty(1 << 20, dtype=torch.uint8)
        with pytest.raises(TimeoutError):
            c.pull(k, out, time.monotonic() + 0.3)


@pytest.mark.timeout(60)
def test_a_killed_daemons_directory_is_not_used(daemon_factory):
    d = daemon_factory(pool_size="4MiB", max_chunk_bytes="1MiB")
    k, h, data = make_chunk(980, 1 << 20)
    with StoreClient(d.address, compat_hash=COMPAT, timeout=2) as c:
        c.publish(k, h, data)
        out = torch.empty(1 << 20, dtype=torch.uint8)
        assert c.pull(k, out, time.monotonic() + 5) == h
        d.kill()

        def refused() -> StoreError | None:  # served from the directory until its heartbeat is STALE_S old
            try:
                c.pull(k, out, time.monotonic() + 2)
            except StoreError as exc:
                return exc
            return None
        exc = wait_for(refused, D.STALE_S + 20, "a pull refused once the killed daemon's directory went stale")
        assert exc.code == "unreachable"


@pytest.mark.timeout(60)
def test_no_directory_daemon_serves_pulls_itself(daemon_factory):
    d = daemon_factory(pool_size="4MiB", max_chunk_bytes="1MiB", no_directory=True)
    k, h, data = make_chunk(990, 1 << 20)
    with StoreClient(d.address, compat_hash=COMPAT) as c:
        assert not c.info["directory"] and c._path.directory is None
        c.publish(k, h, data)
        out = torch.empty(1 << 20, dtype=torch.uint8)
        assert c.pull(k, out, time.monotonic() + 5) == h and torch.equal(out, data)
        s = c.stats()
        assert s["local_pulls"] == 0 and s["pulls"] == 1


@pytest.mark.timeout(60)
def test_client_can_turn_directory_reads_off(daemon_factory):
    d = daemon_factory(pool_size="4MiB", max_chunk_bytes="1MiB")
    k, h, data = make_chunk(991, 1 << 20)
    with StoreClient(d.address, compat_hash=COMPAT, local_reads=False) as c:
        c.publish(k, h, data)
        out = torch.empty(1 << 20, dtype=torch.uint8)
        assert c.pull(k, out, time.monotonic() + 5) == h and torch.equal(out, data)
        wait_for(lambda: c.stats()["pins"] == 0, 5, "pin handed back")
        assert c.stats()["local_pulls"] == 0


@pytest.mark.timeout(120)
def test_pulls_racing_evictions_never_return_wrong_bytes(daemon_factory):
    """A publisher keeps filling a pool of 8 chunks (each publish evicts the oldest) while a puller pulls
    recent chunks through the directory WITHOUT checksum verification: the rows alone must keep every pull
    that succeeds byte-exact (a row an eviction left behind would hand out whatever took its range; the
    narrower window, a row rewritten during the copy, is test_rows_are_a_seqlock's)."""
    import threading
    n, size = 64, 256 << 10
    d = daemon_factory(pool_size=f"{8 * size}", max_chunk_bytes=f"{size}")
    chunks = [make_chunk(2000 + i, size) for i in range(n)]
    latest = [-1]
    stop = threading.Event()
    errors: list[str] = []
    served = [0, 0]

    def publisher():
        with StoreClient(d.address, compat_hash=COMPAT) as c:
            i = 0
            while not stop.is_set():  # round and round: a chunk evicted comes back (same bytes) in a new range
                k, h, data = chunks[i % n]
                c.publish(k, h, data)
                latest[0] = i
                i += 1

    def puller():
        out = torch.empty(size, dtype=torch.uint8)
        t_end = time.monotonic() + 30
        with StoreClient(d.address, compat_hash=COMPAT) as c:
            j = 0
            while served[0] < 400 and time.monotonic() < t_end:
                j += 1
                i = max(0, latest[0] - j % 9)
                k, h, data = chunks[i % n]
                try:
                    c.pull(k, out, time.monotonic() + 0.05, verify_checksum=False)
                except (TimeoutError, StoreError):
                    continue  # evicted before we got to it: fine
                if not torch.equal(out, data):
                    errors.append(f"chunk {i % n}: {int((out != data).sum())} bytes wrong")
                served[0] += 1
            stop.set()
            served[1] = c.stats()["local_pulls"]

    threads = [threading.Thread(target=publisher), threading.Thread(target=puller)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    assert not errors, errors[:5]
    assert served[0] >= 400 and served[1] > 100, served


@pytest.mark.timeout(60)
def test_directory_pulls_keep_a_chunk_alive_under_chunk_ttl(daemon_factory):
    """A chunk pulled only through the directory is reported often enough that chunk_ttl does not drop it."""
    d = daemon_factory(pool_size="4MiB", max_chunk_bytes="1MiB", chunk_ttl=1)
    k, h, data = make_chunk(995, 1 << 20)
    with StoreClient(d.address, compat_hash=COMPAT) as c:
        c.publish(k, h, data)
        out = torch.empty(1 << 20, dtype=torch.uint8)
        for _ in range(15):  # 3 s: three times the TTL
            assert c.pull(k, out, time.monotonic() + 2) == h
            time.sleep(0.2)
        assert c.stats()["local_pulls"] >= 10


@pytest.mark.timeout(60)
@pytest.mark.parametrize("local_reads", [True, False])
def test_an_aborted_request_still_gets_what_is_ready(daemon_factory, local_reads):
    """After abort, what is committed is served (through the directory or the daemon alike); what would have
    to be waited for fails at once with "aborted"."""
    d = daemon_factory(pool_size="4MiB", max_chunk_bytes="1MiB")
    (k, h, data), (k2, _, _) = make_chunk(996, 4096), make_chunk(997, 4096)
    with StoreClient(d.address, compat_hash=COMPAT, local_reads=local_reads) as c:
        c.publish(k, h, data)
        c.abort("req-x", "prefill gave up")
        out = torch.empty(4096, dtype=torch.uint8)
        assert c.pull(k, out, time.monotonic() + 5, request_id="req-x") == h and torch.equal(out, data)
        t0 = time.monotonic()
        with pytest.raises(StoreError, match="prefill gave up") as ei:
            c.pull_many([k, k2], [out, torch.empty(4096, dtype=torch.uint8)], time.monotonic() + 20,
                        request_id="req-x")
        assert ei.value.code == "aborted" and time.monotonic() - t0 < 5


def test_pull_after_close_is_a_clear_error(daemon_factory):
    d = daemon_factory(pool_size="4MiB", max_chunk_bytes="1MiB")
    k, h, data = make_chunk(998, 4096)
    c = StoreClient(d.address, compat_hash=COMPAT)
    c.publish(k, h, data)
    c.close()
    for call in (lambda: c.pull(k, torch.empty(4096, dtype=torch.uint8), time.monotonic() + 1),
                 lambda: c.pull_many([k], [torch.empty(4096, dtype=torch.uint8)], time.monotonic() + 1)):
        with pytest.raises(StoreError, match="closed"):
            call()
