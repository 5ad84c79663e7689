"""The transport conformance suite: the same tests against every transport available here.

Each transport talks to a real peer process on 127.0.0.1 (conftest.spawn_peer).  Comparisons are
byte-exact; leaks are counted (open handles, shared-memory segments).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import xxhash

from kvrelay.transfer import create_transport
from kvrelay.transfer.base import Desc, HandshakeError, TransferError, XferState
from kvrelay.transfer.shm import segments

from waiting import wait_until
from xfer_peers import COMPAT, MIB

pytestmark = pytest.mark.timeout(300)  # includes starting peer processes (importing torch) on a loaded host


def random_descs(rng: np.random.Generator, count: int, max_len: int, local_size: int,
                 remote_sizes: dict[int, int], local_region: int) -> list[Desc]:
    """Non-overlapping local ranges (in a random permutation), random remote ranges."""
    lengths = rng.integers(1, max_len + 1, count)
    lengths[0] = 1
    slots = np.cumsum(np.concatenate([[0], lengths[:-1] + rng.integers(0, 64, count - 1)]))
    if slots[-1] + lengths[-1] > local_size:
        raise AssertionError("test descs do not fit the local region")
    descs = []
    for i in rng.permutation(count):
        rid = list(remote_sizes)[int(rng.integers(0, len(remote_sizes)))]
        n = int(min(lengths[i], remote_sizes[rid]))
        roff = int(rng.integers(0, remote_sizes[rid] - n + 1))
        descs.append(Desc(local_region, int(slots[i]), rid, roff, n))
    return descs


def peer_sum(ep, peer, rid: int, timeout: float = 20.0) -> str:
    ep.notify(peer, f"sum:{rid}".encode())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for n in ep.get_notifications(timeout=0.5):
            msg = n.payload.decode()
            if msg.startswith(f"sum:{rid}:"):
                return msg.rsplit(":", 1)[1]
    raise AssertionError(f"peer did not answer sum:{rid} within {timeout}s")


def finish(handle) -> None:
    """Wait for success, then release (every test ends with no open handles)."""
    with handle:
        handle.result()


def small_remotes(peer) -> dict[int, int]:
    return {peer.regions[0]: peer.sizes[0], peer.regions[1]: peer.sizes[1]}


@pytest.mark.parametrize("seed,count,max_len", [(1, 1, 1), (2, 200, 4096), (3, 40, 300_000), (4, 8, 2 * MIB)])
def test_read_random_permuted_descs_byte_exact(endpoint, peer, connected, local, seed, count, max_len):
    rid, buf = local["a"]
    rng = np.random.default_rng(seed)
    descs = random_descs(rng, count, max_len, buf.size, small_remotes(peer), rid)
    buf[:] = 0
    with endpoint.read(connected, descs, timeout=30) as h:
        h.result()
        assert h.state is XferState.DONE
    src = {peer.regions[i]: peer.expected(i) for i in (0, 1)}
    for d in descs:
        want = src[d.remote_region][d.remote_offset:d.remote_offset + d.length]
        got = buf[d.local_offset:d.local_offset + d.length]
        assert np.array_equal(got, want), f"mismatch in {d}"
    assert endpoint.open_handles() == 0


@pytest.mark.parametrize("seed,count,max_len", [(5, 1, 1), (6, 300, 2048), (7, 12, MIB + 3)])
def test_write_random_permuted_descs_byte_exact(endpoint, peer, connected, local, seed, count, max_len):
    rid, buf = local["a"]
    rid_b, back = local["b"]
    rng = np.random.default_rng(seed)
    # writes must not overlap on the remote side: write into region 1 at disjoint offsets
    lengths = [int(x) for x in rng.integers(1, max_len + 1, count)]
    total = sum(lengths)
    if total > peer.sizes[0]:
        lengths = [max(1, n * peer.sizes[0] // (total + count)) for n in lengths]
    roffs = np.cumsum([0] + lengths[:-1]).tolist()
    loffs = rng.permutation(np.cumsum([0] + lengths[:-1]))  # permuted local order
    buf[:] = rng.integers(0, 256, buf.size, dtype=np.uint8)
    descs = [Desc(rid, int(lo), peer.regions[0], int(ro), n) for lo, ro, n in zip(loffs, roffs, lengths, strict=True)]
    order = rng.permutation(len(descs))
    with endpoint.write(connected, [descs[i] for i in order], timeout=30) as h:
        h.result()
    # read everything back into another region and compare byte for byte
    back[:] = 0
    rb = [Desc(rid_b, d.local_offset, d.remote_region, d.remote_offset, d.length) for d in descs]
    with endpoint.read(connected, rb, timeout=30) as h:
        h.result()
    for d in descs:
        assert np.array_equal(back[d.local_offset:d.local_offset + d.length],
                              buf[d.local_offset:d.local_offset + d.length]), f"mismatch in {d}"
    # and the peer agrees on the whole region's contents
    expected = peer.expected(0)
    for d in descs:
        expected[d.remote_offset:d.remote_offset + d.length] = buf[d.local_offset:d.local_offset + d.length]
    assert peer_sum(endpoint, connected, peer.regions[0]) == xxhash.xxh3_64_hexdigest(expected)
    # restore the peer's region for the other tests
    restore = peer.expected(0)
    buf[:restore.size] = restore
    finish(endpoint.write(connected, [Desc(rid, 0, peer.regions[0], 0, restore.size)]))


def test_64mib_read_and_write(endpoint, peer, connected, local):
    rid, buf = local["a"]
    big = peer.regions[2]
    with endpoint.read(connected, [Desc(rid, 0, big, 0, 64 * MIB)], timeout=60) as h:
        h.result()
    assert np.array_equal(buf[:64 * MIB], peer.expected(2))
    buf[:64 * MIB] = buf[:64 * MIB][::-1]
    with endpoint.write(connected, [Desc(rid, 0, big, 0, 64 * MIB)], timeout=60) as h:
        h.result()
    assert peer_sum(endpoint, connected, big) == xxhash.xxh3_64_hexdigest(peer.expected(2)[::-1].copy())


def test_many_concurrent_transfers(endpoint, peer, connected, local):
    rid, buf = local["b"]
    src = peer.expected(1)
    buf[:] = 0
    n_threads, per_thread, chunk = 4, 32, 4096 + 13
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            handles = []
            for i in range(per_thread):
                k = t * per_thread + i
                handles.append(endpoint.read(connected, [Desc(rid, k * chunk, peer.regions[1], k * chunk, chunk)],
                                             timeout=30))
            for h in handles:
                h.result()
                h.release()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    total = n_threads * per_thread * chunk
    assert np.array_equal(buf[:total], src[:total])
    assert endpoint.open_handles() == 0


def test_notifications_both_ways(endpoint, peer, connected):
    endpoint.get_notifications()
    for i in range(20):
        endpoint.notify(connected, f"echo:hello-{i}".encode())
    got: list[bytes] = []
    deadline = time.monotonic() + 20
    while len(got) < 20 and time.monotonic() < deadline:
        got += [n.payload for n in endpoint.get_notifications(timeout=0.5)]
    assert got == [f"hello-{i}".encode() for i in range(20)]
    with pytest.raises(ValueError, match="limit"):
        endpoint.notify(connected, b"x" * (2 << 20))


def test_deadline_expiry_then_still_usable(endpoint, peer, connected, local):
    rid, buf = local["a"]
    t0 = time.monotonic()
    h = endpoint.read(connected, [Desc(rid, 0, peer.regions[2], 0, 64 * MIB)], timeout=0.0005)
    state = h.wait(10)
    elapsed = time.monotonic() - t0
    assert state is XferState.FAILED and "deadline" in h.error, (state, h.error)
    assert elapsed < 5, elapsed
    with pytest.raises(TransferError, match="deadline"):
        h.result()
    h.release()
    _still_usable(endpoint, peer, connected, local)


def _still_usable(endpoint, peer, connected, local) -> None:
    """A read after an expired or cancelled one is byte-exact.  It lands in the other local region: the
    abandoned transfer's tail may still be landing in the first, and nothing need wait for it."""
    rid, buf = local["b"]
    buf[:MIB] = 0
    finish(endpoint.read(connected, [Desc(rid, 0, peer.regions[1], 0, MIB)]))
    assert np.array_equal(buf[:MIB], peer.expected(1))
    assert endpoint.open_handles() == 0


def test_cancel(endpoint, peer, connected, local):
    rid, buf = local["a"]
    h = endpoint.read(connected, [Desc(rid, 0, peer.regions[2], 0, 64 * MIB)], timeout=30)
    h.cancel()
    assert h.wait(10) in (XferState.CANCELLED, XferState.DONE)
    if h.state is XferState.CANCELLED:
        assert "cancel" in h.error
    h.release()
    h.release()  # idempotent
    _still_usable(endpoint, peer, connected, local)


def test_descs_outside_registered_regions(endpoint, peer, connected, local):
    rid, _ = local["a"]
    small = peer.regions[1]
    bad = [
        Desc(rid, 0, small, MIB - 10, 11),           # past the remote end
        Desc(rid, 80 * MIB - 1, small, 0, 2),        # past the local end
        Desc(rid + 1000, 0, small, 0, 1),            # unknown local region
        Desc(rid, 0, small + 1000, 0, 1),            # unknown remote region
        Desc(rid, -1, small, 0, 1),                  # negative
    ]
    for d in bad:
        with pytest.raises(ValueError):
            endpoint.read(connected, [d])
        with pytest.raises(ValueError):
            endpoint.write(connected, [Desc(rid, 0, small, 0, 4), d])
    assert endpoint.open_handles() == 0
    finish(endpoint.read(connected, [Desc(rid, 0, small, 0, 16)]))  # still fine


def test_compat_mismatch_refused_at_handshake(transport_name, peer):
    with create_transport(transport_name, "other", "compat-OTHER") as ep:
        with pytest.raises(HandshakeError) as exc:
            ep.connect(peer.address, timeout=20)
        assert "compat-OTHER" in str(exc.value) and COMPAT in str(exc.value)


def test_connect_to_nothing_fails_within_timeout(transport_name):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with create_transport(transport_name, "lonely", COMPAT) as ep:
        t0 = time.monotonic()
        with pytest.raises(HandshakeError, match="no handshake answer"):
            ep.connect(f"tcp://127.0.0.1:{port}", timeout=0.5)
        assert time.monotonic() - t0 < 3


def test_peer_killed_mid_transfer(transport_name, fresh_peer):
    import os
    mine = lambda: [s for s in segments() if s.startswith(f"kvrelay-xfer-{os.getpid()}-")]  # noqa: E731
    before = mine()
    with create_transport(transport_name, "survivor", COMPAT) as ep:
        victim = fresh_peer()
        peer = ep.connect(victim.address, timeout=30)
        info, view = ep.alloc(64 * MIB)
        finish(ep.read(peer, [Desc(info.region_id, 0, victim.regions[1], 0, MIB)]))  # it works first
        # Keep 64 MiB reads in flight from another thread while the peer is killed.
        handles: list = []
        stop = threading.Event()

        def issue() -> None:
            while not stop.is_set():
                h = ep.read(peer, [Desc(info.region_id, 0, victim.regions[0], 0, 64 * MIB)], timeout=8)
                handles.append(h)
                if h.wait() is not XferState.DONE:
                    return

        thread = threading.Thread(target=issue)
        thread.start()
        wait_until(lambda: len(handles) >= 2 or not thread.is_alive(), 30, "a first read done, a second in flight")
        victim.kill()
        t0 = time.monotonic()
        thread.join(20)
        stop.set()
        assert not thread.is_alive()
        states = [h.wait() for h in handles]
        assert time.monotonic() - t0 < 9, "a handle outlived its deadline"
        assert len(handles) >= 2 and all(s.terminal for s in states)
        failed = [h for h in handles if h.state is XferState.FAILED]
        assert failed, "no transfer noticed the peer's death"
        assert all(h.error for h in failed)
        # the peer's death is detected promptly: within 5 s a new transfer fails naming the reason (a transport
        # such as NIXL may fail one first with its own disconnect error, before the peer's exit is seen)
        def refused_naming_the_reason():
            h = ep.read(peer, [Desc(info.region_id, 0, victim.regions[1], 0, 64)], timeout=2)
            h.wait()
            handles.append(h)
            return h.state is XferState.FAILED and ("exited" in h.error or "stale" in h.error)
        wait_until(refused_naming_the_reason, 5, "a read refused for the peer's exit",
                   detail=lambda: handles[-1].error or str(handles[-1].state))
        for h in handles:
            h.release()
        assert ep.open_handles() == 0
    assert mine() == before, "shared-memory segments of this process leaked"
    assert not [s for s in segments() if s.startswith(f"kvrelay-xfer-{victim.pid}-")], "the dead peer's segments leaked"


def test_peer_restart_is_a_new_epoch(transport_name, fresh_peer, local, endpoint):
    rid, buf = local["b"]
    first = fresh_peer(name="phoenix", seed=11, sizes=(MIB,))
    old = endpoint.connect(first.address, timeout=30)
    finish(endpoint.read(old, [Desc(rid, 0, first.regions[0], 0, MIB)]))
    assert np.array_equal(buf[:MIB], first.expected(0))
    first.kill()
    second = fresh_peer(name="phoenix", seed=12, sizes=(MIB,))
    new = endpoint.connect(second.address, timeout=30)
    assert new.name == old.name and new.info.epoch != old.info.epoch
    with endpoint.read(old, [Desc(rid, 0, first.regions[0], 0, 16)], timeout=2) as h:
        assert h.wait() is XferState.FAILED and ("stale" in h.error or "restarted" in h.error), h.error
    finish(endpoint.read(new, [Desc(rid, 0, second.regions[0], 0, MIB)]))
    assert np.array_equal(buf[:MIB], second.expected(0))
    assert endpoint.open_handles() == 0
