"""`kill -9` and restart: every fully written chunk is found and verified from SSD; torn writes and a
flipped byte are detected and dropped; the daemon keeps serving."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from store_helpers import COMPAT, Daemon, make_chunk, wait_for
from kvrelay.store.client import StoreClient, StoreError
from kvrelay.store.pool import ALIGN

SZ = 96 * 1024 + 123
OPTS = dict(pool_size="4MiB", max_chunk_bytes="1MiB", ssd_size="16MiB", ssd_segment_size="4MiB")


def start(tmp: Path, pool_name: str | None = None) -> Daemon:
    opts = dict(OPTS, ssd_dir=tmp / "ssd")
    if pool_name:
        opts["pool_name"] = pool_name
    return Daemon(tmp, **opts).start()


def fill(d: Daemon, chunks) -> None:
    with StoreClient(d.address, compat_hash=COMPAT) as c:
        c.reserve("fill", [(k, h.nbytes) for k, h, _ in chunks])
        for k, h, data in chunks:
            c.publish_buffer(k).copy_(data)
            c.commit(k, h)
        wait_for(lambda: c.stats()["ssd_chunks"] == len(chunks), 20, "everything spilled")


def record_offsets(ssd: Path) -> list[tuple[Path, int]]:
    """(segment, offset) of every record head, found by their magic."""
    out = []
    for seg in sorted(ssd.glob("seg-*.kvs")):
        data = seg.read_bytes()
        out += [(seg, off) for off in range(0, len(data), ALIGN) if data[off:off + 4] in (b"KVR1", b"KVR2")]
    return out


@pytest.mark.timeout(120)
def test_kill9_restart_recovers_verified_chunks_and_drops_torn_and_flipped(tmp_path):
    chunks = [make_chunk(300 + i, SZ, layer=i % 4) for i in range(20)]
    d = start(tmp_path)
    try:
        fill(d, chunks)
        d.kill()  # SIGKILL: no shutdown code runs
        ssd = tmp_path / "ssd"
        recs = record_offsets(ssd)
        assert len(recs) == 20
        # a flipped payload byte in one record, a corrupt head in another
        seg, off = recs[3]
        with open(seg, "r+b") as fh:
            fh.seek(off + ALIGN + 1000)
            b = fh.read(1)
            fh.seek(off + ALIGN + 1000)
            fh.write(bytes([b[0] ^ 0x01]))
        seg, off = recs[7]
        with open(seg, "r+b") as fh:
            fh.seek(off + 40)
            fh.write(b"\xff\xff")
        # a torn journal tail (a frame cut short by the crash)
        with open(ssd / "journal.log", "ab") as fh:
            fh.write(b"\x40\x00\x00\x00\x01\x02\x03")
        d2 = start(tmp_path, pool_name=d.pool_name)
        try:
            assert d2.info["recovered"] == 18 and d2.info["recover_dropped"] == 2
            assert d2.info["startup_seconds"] < 10
            flipped = {r for r in (3, 7)}
            with StoreClient(d2.address, compat_hash=COMPAT) as c:
                out = torch.empty(SZ, dtype=torch.uint8)
                good = [ch for i, ch in enumerate(chunks) if i not in flipped]
                # a batch read back from SSD in the background, then answered in one reply
                outs = [torch.empty(SZ, dtype=torch.uint8) for _ in range(6)]
                assert c.pull_many([k for k, _, _ in good[:6]], outs, time.monotonic() + 10) == \
                    [h for _, h, _ in good[:6]]
                assert all(torch.equal(o, data) for o, (_, _, data) in zip(outs, good[:6], strict=True))
                for i, (k, h, data) in enumerate(chunks):
                    if i in flipped:
                        assert c.lookup([k]) == 0
                        continue
                    assert c.lookup([k]) == 1
                    assert c.pull(k, out, time.monotonic() + 5) == h
                    assert torch.equal(out, data)
                assert c.stats()["ssd_promotions"] == 18
                # the store keeps serving new publishes after recovery
                k, h, data = make_chunk(399, SZ)
                c.publish(k, h, data)
                assert c.pull(k, out, time.monotonic() + 5) == h and torch.equal(out, data)
        finally:
            d2.cleanup()
        # a second crash right after recovery: the rewritten journal still finds everything
        d3 = start(tmp_path)
        try:
            assert d3.info["recovered"] in (18, 19) and d3.info["recover_dropped"] == 0
        finally:
            d3.cleanup()
    finally:
        d.cleanup()


@pytest.mark.timeout(90)
def test_flipped_byte_on_ssd_detected_on_read_back(tmp_path):
    # pool holds ~40 chunks; 60 published: the oldest live only on SSD and are read back on pull
    chunks = [make_chunk(500 + i, SZ) for i in range(60)]
    d = start(tmp_path)
    try:
        with StoreClient(d.address, compat_hash=COMPAT) as c:
            for n, part in ((30, chunks[:30]), (60, chunks[30:])):
                fill_part(c, part)  # the first 30 reach the SSD before the next 30 push them out of memory
                wait_for(lambda n=n: c.stats()["ssd_chunks"] == n, 20, "spill")
            s = c.stats()
            assert s["memory_chunks"] < 60
            victim = chunks[0]  # least recently used: evicted from memory
            seg, off = record_offsets(tmp_path / "ssd")[0]
            with open(seg, "r+b") as fh:
                fh.seek(off + ALIGN + 5)
                b = fh.read(1)
                fh.seek(off + ALIGN + 5)
                fh.write(bytes([b[0] ^ 0x80]))
            out = torch.empty(SZ, dtype=torch.uint8)
            with pytest.raises(StoreError, match="checksum"):
                c.pull(victim[0], out, time.monotonic() + 5)
            assert c.lookup([victim[0]]) == 0  # dropped
            k, h, data = chunks[1]
            assert c.pull(k, out, time.monotonic() + 5) == h and torch.equal(out, data)
            assert c.stats()["checksum_failures"] == 1
    finally:
        d.cleanup()


def fill_part(c: StoreClient, chunks) -> None:
    for k, h, data in chunks:
        c.publish(k, h, data)


@pytest.mark.timeout(90)
def test_disk_failure_is_counted_and_the_daemon_keeps_serving(tmp_path):
    """The SSD directory disappears (a stand-in for a full or failed disk): spills fail and are counted,
    publishers are not blocked, and every chunk stays pullable from memory."""
    import shutil
    d = Daemon(tmp_path, ssd_dir=tmp_path / "ssd", pool_size="4MiB", max_chunk_bytes="256KiB",
               ssd_size="4MiB", ssd_segment_size="512KiB").start()
    try:
        with StoreClient(d.address, compat_hash=COMPAT) as c:
            first = [make_chunk(600 + i, 50_000) for i in range(4)]
            fill_part(c, first)
            wait_for(lambda: c.stats()["ssd_chunks"] == 4, 20, "spill")
            shutil.rmtree(tmp_path / "ssd")
            more = [make_chunk(610 + i, 50_000) for i in range(30)]
            t0 = time.monotonic()
            fill_part(c, more)
            assert time.monotonic() - t0 < 20
            wait_for(lambda: c.stats()["spill_errors"] > 0, 20, "a failed spill")
            s = c.stats()
            assert "cannot create segment" in s["last_spill_error"]
            out = torch.empty(50_000, dtype=torch.uint8)
            for k, h, data in first + more:
                assert c.pull(k, out, time.monotonic() + 5) == h and torch.equal(out, data)
    finally:
        d.cleanup()


@pytest.mark.timeout(120)
def test_auto_named_pool_of_a_killed_daemon_is_swept_by_the_next(tmp_path):
    """--port 0 without --pool-name names the pool after the daemon's pid; kill -9 leaves it in /dev/shm
    and the next daemon to start removes it (its owner is dead)."""
    import os
    from kvrelay import proc

    def spawn(i: int):
        p = proc.spawn_kvrelay(["store", "--port", "0", "--metrics-port", "-1", "--pool-size", "8MiB",
                                "--log-level", "WARNING"], name=f"store daemon {i}", log=tmp_path / f"daemon{i}.log",
                               ready_file=tmp_path / f"ready{i}.json")
        return p, p.wait_ready(60)

    p1, info1 = spawn(1)
    seg = f"/dev/shm/{info1['pool_name']}"
    try:
        assert info1["pool_name"] == f"kvrelay-store-0-{p1.pid}" and os.path.exists(seg)
    finally:
        p1.kill()  # SIGKILL and reap
    assert os.path.exists(seg)  # SIGKILL: nobody unlinked it
    p2, info2 = spawn(2)
    try:
        assert not os.path.exists(seg)
        assert os.path.exists(f"/dev/shm/{info2['pool_name']}")  # a live daemon's pool is left alone
    finally:
        p2.stop(30)  # SIGTERM, up to 30 s (then SIGKILL: the assertion below fails)
        if os.path.exists(seg):  # the sweep failed: do not leave it behind
            os.unlink(seg)
    assert not os.path.exists(f"/dev/shm/{info2['pool_name']}")  # a clean stop unlinks its own


@pytest.mark.timeout(180)
@pytest.mark.parametrize("transport,ctl", [("shm", "auto"), ("shm", "zmq"), ("tcp", "auto")])
def test_clients_survive_a_daemon_restart(tmp_path, transport, ctl):
    """kill -9 the daemon and start it again on the same port: a client that lived through it notices the new
    epoch on its next call, re-handshakes (new pool mapping, or new transport peer) and carries on: chunks
    recovered from SSD pull, new ones publish.  Over the same-host socket the client sees the old one closed
    and connects anew; over ZMQ the new daemon answers "session" and the client says hello again."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    chunks = [make_chunk(800 + i, SZ) for i in range(6)]
    opts = dict(OPTS, ssd_dir=tmp_path / "ssd", port=port, transports="shm,tcp")
    d = Daemon(tmp_path, **opts).start()
    try:
        with StoreClient(d.address, transport=transport, compat_hash=COMPAT, control=ctl) as c:
            assert c._sock().kind == ("local" if ctl == "auto" else "zmq")
            out = torch.empty(SZ, dtype=torch.uint8)
            c.register_buffer(out)
            c.reserve("before", [(k, h.nbytes) for k, h, _ in chunks[:4]])
            for k, h, data in chunks[:4]:
                c.publish(k, h, data)
            wait_for(lambda: c.stats()["ssd_chunks"] == 4, 20, "spill")
            epoch = c.info["epoch"]
            d.kill()
            d2 = Daemon(tmp_path, **dict(opts, pool_name=d.pool_name)).start()
            try:
                assert d2.info["recovered"] == 4
                for k, h, data in chunks[:4]:  # the first call meets the new daemon: re-handshake, retry
                    assert c.pull(k, out, time.monotonic() + 10) == h and torch.equal(out, data)
                assert c.info["epoch"] != epoch
                for k, h, data in chunks[4:]:
                    c.publish(k, h, data)
                    assert c.pull(k, out, time.monotonic() + 10) == h and torch.equal(out, data)
                c.ping()
                assert c.stats()["pins"] == 0  # the pins it handed back were the new daemon's
                assert c._sock().kind == ("local" if ctl == "auto" else "zmq")
            finally:
                d2.cleanup()
    finally:
        d.cleanup()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ctl", ["auto", "zmq"])
def test_a_wait_fails_at_once_when_the_daemon_dies(tmp_path, ctl):
    """A pull parked on the store (30 s deadline) fails within seconds with 'unreachable' when the daemon is
    killed: the client sees its end of file (same-host socket) or its socket monitor sees the disconnect
    (ZMQ); nothing waits out the deadline."""
    import threading
    d = start(tmp_path)
    try:
        with StoreClient(d.address, compat_hash=COMPAT, timeout=30, control=ctl) as c:
            k, h, data = make_chunk(900, 4096)
            got: dict = {}

            def waiter() -> None:
                t0 = time.monotonic()
                try:
                    c.pull(k, torch.empty(4096, dtype=torch.uint8), time.monotonic() + 30)
                except StoreError as exc:
                    got["exc"], got["after"] = exc, time.monotonic() - t0
            with StoreClient(d.address, compat_hash=COMPAT, control=ctl) as probe:
                parked = probe.stats()["waiters"]
                t = threading.Thread(target=waiter)
                t.start()
                wait_for(lambda: probe.stats()["waiters"] == parked + 1, 20, "the pull parked on the never-published chunk")
            d.kill()
            t.join(20)
            assert not t.is_alive()
            assert got["exc"].code == "unreachable" and "lost the connection" in str(got["exc"])
            assert got["after"] < 10
    finally:
        d.cleanup()


@pytest.mark.timeout(60)
def test_a_slowed_daemon_does_not_stretch_a_pull_past_its_deadline(tmp_path, monkeypatch):
    """The daemon answers each request 5 s late (fault injection): a pull with a 0.5 s deadline gives up
    about a second after it with a 'timeout' (the caller recomputes), not 'unreachable' (the store is not
    dead: no breaker should open) and not after a whole 10 s client timeout."""
    monkeypatch.setenv("KVRELAY_FAULT_STORE_DELAY_MS", "5000")
    d = start(tmp_path)
    try:
        with StoreClient(d.address, compat_hash=COMPAT, timeout=10) as c:
            k, _, _ = make_chunk(990, 4096)
            t0 = time.monotonic()
            with pytest.raises(StoreError) as ei:
                c.pull(k, torch.empty(4096, dtype=torch.uint8), time.monotonic() + 0.5)
            assert ei.value.code == "timeout" and "deadline" in str(ei.value)
            assert time.monotonic() - t0 < 4.5
    finally:
        d.cleanup()
