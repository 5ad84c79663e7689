"""Filling past capacity (LRU eviction, then refusal), leases and their expiry, reservation expiry,
eviction to SSD and promotion back."""

from __future__ import annotations

import time
import urllib.request

import pytest
import torch

from store_helpers import COMPAT, make_chunk, metric, wait_for
from kvrelay.store.client import StoreClient, StoreError, StoreFullError

SZ = 200 * 1024  # 50 pages; a 1 MiB pool (256 pages) holds 5


def publish_all(c, chunks):
    for k, h, d in chunks:
        c.publish(k, h, d)


@pytest.mark.timeout(60)
def test_evict_lru_then_refuse_then_lease_expiry(daemon_factory):
    d = daemon_factory(pool_size="1MiB", max_chunk_bytes="256KiB")
    a = [make_chunk(10 + i, SZ) for i in range(5)]
    b = make_chunk(20, SZ)
    c_ = make_chunk(21, SZ)
    with StoreClient(d.address, compat_hash=COMPAT) as c:
        publish_all(c, a)
        assert c.lookup([k for k, _, _ in a]) == 5
        c.lookup([a[0][0]])  # lookups do not touch the LRU; pulls do
        c.pull(a[0][0], torch.empty(SZ, dtype=torch.uint8), time.monotonic() + 2)  # a0 is now most recent
        publish_all(c, [b])  # evicts the least recently used: a1
        assert c.lookup([a[1][0]]) == 0
        assert c.lookup([a[0][0]]) == 1 and c.lookup([k for k, _, _ in a[2:]]) == 3
        s = c.stats()
        assert s["evictions_memory"] == 1 and s["evictions_dropped"] == 1
        # all-or-nothing: six chunks can never fit; nothing is evicted for a refused request
        with pytest.raises(StoreFullError, match="pool full"):
            c.reserve("huge", [(make_chunk(30 + i, SZ)[0], SZ) for i in range(6)])
        assert c.lookup([k for k, _, _ in [a[0]] + a[2:] + [b]]) == 5
        # pin everything: a new chunk is refused with a clear message
        c.lease([k for k, _, _ in [a[0]] + a[2:] + [b]], ttl=1.0)
        with pytest.raises(StoreFullError, match="pinned"):
            c.reserve("r", [(c_[0], SZ)])
        # leases expire (the daemon's sweep, on the real clock: test_core_clock.py drives the same rule with a
        # ManualClock); then eviction makes room again
        wait_for(lambda: c.stats()["lease_expiries"] == 5, 30, "lease expiry")
        c.reserve("r", [(c_[0], SZ)])
        c.publish_buffer(c_[0]).copy_(c_[2])
        c.commit(c_[0], c_[1])
        out = torch.empty(SZ, dtype=torch.uint8)
        c.pull(c_[0], out, time.monotonic() + 2)
        assert torch.equal(out, c_[2])
        s = c.stats()
        assert s["lease_expiries"] == 5 and s["admission_refusals"] == 2 and s["pins"] <= 1
        text = urllib.request.urlopen(d.metrics_url + "/metrics", timeout=5).read().decode()
        assert metric(text, "kvrelay_store_lease_expiries_total") == 5
        assert metric(text, "kvrelay_store_admission_refusals_total") == 2
        assert metric(text, 'kvrelay_store_chunks{tier="memory"}') == 5


@pytest.mark.timeout(60)
def test_release_and_reservation_expiry(daemon_factory):
    d = daemon_factory(pool_size="1MiB", max_chunk_bytes="256KiB", chunk_ttl=1.0)
    k1, h1, d1 = make_chunk(40, SZ)
    k2, h2, _ = make_chunk(41, SZ)
    with StoreClient(d.address, compat_hash=COMPAT) as c:
        c.reserve("gone", [(k1, SZ)], ttl=0.4)
        assert c.stats()["reserved_chunks"] == 1
        wait_for(lambda: c.stats()["reserved_chunks"] == 0, 5, "reservation expiry")
        assert c.stats()["reservation_expiries"] == 1 and c.stats()["pool_used_bytes"] == 0
        with pytest.raises(StoreError, match="no reservation"):
            c.publish_buffer(k1).copy_(d1)
            c.commit(k1, h1)
        c.reserve("abort", [(k2, SZ)])
        c.release("abort")  # an aborted request gives back everything it held
        s = c.stats()
        assert s["reserved_chunks"] == 0 and s["pool_used_bytes"] == 0
        # chunk_ttl: a chunk nobody touches expires
        k3, h3, d3 = make_chunk(42, SZ)
        c.publish(k3, h3, d3)
        assert c.lookup([k3]) == 1
        wait_for(lambda: c.lookup([k3]) == 0, 5, "chunk ttl expiry")
        s = c.stats()
        assert s["ttl_expiries"] == 1 and s["pool_used_bytes"] == 0


def ssd_chunks(d) -> float:
    """Chunks on the daemon's SSD, read on /metrics: no control-plane traffic (a stats request is, and would
    hold the spiller back until spill_max_delay)."""
    text = urllib.request.urlopen(d.metrics_url + "/metrics", timeout=5).read().decode()
    return metric(text, 'kvrelay_store_chunks{tier="ssd"}')


@pytest.mark.timeout(90)
def test_eviction_to_ssd_and_back(daemon_factory, tmp_path):
    d = daemon_factory(pool_size="1MiB", max_chunk_bytes="256KiB", ssd_dir=tmp_path / "ssd", ssd_size="8MiB",
                       ssd_segment_size="2MiB")
    chunks = [make_chunk(50 + i, SZ) for i in range(12)]
    with StoreClient(d.address, compat_hash=COMPAT) as c:
        for ch in chunks:
            publish_all(c, [ch])
            wait_for(lambda ch=ch: ssd_chunks(d) >= chunks.index(ch) + 1, 10, "spill")
        assert c.lookup([k for k, _, _ in chunks]) == 12  # 5 in memory, all 12 on SSD
        s = c.stats()
        assert s["memory_chunks"] <= 5 and s["ssd_chunks"] == 12 and s["evictions_dropped"] == 0
        out = torch.empty(SZ, dtype=torch.uint8)
        for k, h, data in chunks:
            assert c.pull(k, out, time.monotonic() + 5) == h
            assert torch.equal(out, data)
        s = c.stats()
        assert s["ssd_promotions"] >= 7 and s["ssd_bytes_read"] > 0
        text = urllib.request.urlopen(d.metrics_url + "/metrics", timeout=5).read().decode()
        assert metric(text, 'kvrelay_store_ssd_gbps{direction="write"}') > 0
        assert metric(text, 'kvrelay_store_chunks{tier="ssd"}') == 12


@pytest.mark.timeout(90)
def test_spills_wait_for_quiet_but_no_longer_than_spill_max_delay(daemon_factory, tmp_path):
    """The spiller writes once the control plane has been quiet for spill_quiet; under traffic that never
    pauses that long, a chunk still reaches the SSD once spill_max_delay has passed since its commit."""
    opts = dict(pool_size="64MiB", max_chunk_bytes="4MiB", ssd_size="256MiB", ssd_segment_size="32MiB",
                spill_quiet=0.5)

    def busy(c: StoreClient, seconds: float) -> None:  # a request every few ms: never 0.5 s of quiet
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            c.ping()
            time.sleep(0.005)

    d = daemon_factory(ssd_dir=tmp_path / "ssd1", spill_max_delay=60, **opts)
    with StoreClient(d.address, compat_hash=COMPAT) as c:
        k, h, data = make_chunk(5100, 1 << 20)
        c.publish(k, h, data)
        busy(c, 1.5)
        assert c.stats()["ssd_chunks"] == 0  # held back while busy
        # watched on /metrics, which is no control-plane traffic (a stats request would be: it resets the quiet)
        wait_for(lambda: ssd_chunks(d) == 1, 20, "spilled once the control plane was quiet")
    d2 = daemon_factory(ssd_dir=tmp_path / "ssd2", spill_max_delay=1.0, **opts)
    with StoreClient(d2.address, compat_hash=COMPAT) as c:
        k, h, data = make_chunk(5101, 1 << 20)
        c.publish(k, h, data)
        deadline = time.monotonic() + 30
        while c.stats()["ssd_chunks"] < 1:  # busy all along: written once the max delay is up
            assert time.monotonic() < deadline, "never spilled under continuous traffic"
            busy(c, 0.1)
    from kvrelay.store.config import StoreConfig
    for bad in (dict(spill_max_delay=-1), dict(spill_quiet=0)):
        with pytest.raises(ValueError, match="spill_"):
            StoreConfig(**bad)
