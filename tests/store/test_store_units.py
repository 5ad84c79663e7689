"""Unit tests of the pieces that need no daemon: the arena allocator and the SSD tier's journal."""

from __future__ import annotations

import random

import pytest

from kvrelay.keys import ChunkKey
from kvrelay.store.pool import ALIGN, Arena, SharedPool
from kvrelay.store.ssd import SsdTier
from kvrelay.transfer.wire import ChunkHeader, checksum


def test_arena_alloc_free_coalesce_and_no_leak():
    a = Arena(64 * ALIGN)
    rng = random.Random(0)
    live: dict[int, int] = {}
    for _ in range(2000):
        if live and rng.random() < 0.5:
            off = rng.choice(list(live))
            a.free(off, live.pop(off))
        else:
            n = rng.randint(1, 6 * ALIGN)
            off = a.alloc(n)
            if off is not None:
                assert off % ALIGN == 0
                assert all(off + n <= o or o + m <= off for o, m in live.items())  # no overlap
                live[off] = n
    for off, n in live.items():
        a.free(off, n)
    assert a.used == 0 and a.largest_free() == 64 * ALIGN  # fully coalesced
    off = a.alloc(ALIGN)
    with pytest.raises(ValueError, match="double free"):
        a.free(off, ALIGN)
        a.free(off, ALIGN)
    assert a.alloc(65 * ALIGN) is None


def test_shared_pool_attach_sees_writes():
    name = "kvrelay-unit-pool"
    p = SharedPool(name, 8 * ALIGN, create=True)
    try:
        q = SharedPool(name)
        q.view[100:104] = b"abcd"
        assert bytes(p.view[100:104]) == b"abcd"
        q.close()
    finally:
        p.close()
    with pytest.raises(ValueError, match="does not exist"):
        SharedPool(name)


@pytest.mark.parametrize("direct", ["off", "auto"])
def test_ssd_tier_roundtrip_and_journal_replay(tmp_path, direct):
    import mmap
    t = SsdTier(str(tmp_path), 4 << 20, 1 << 20, direct=direct)
    assert t.recover() == ([], 0)
    buf = mmap.mmap(-1, 64 * ALIGN)
    locs = []
    for i in range(12):  # 12 x ~100 KiB over 1 MiB segments and a 4 MiB cap: the oldest segment is reclaimed
        n = 100_000 + i
        buf[:n] = bytes([i]) * n
        h = ChunkHeader(compat_hash="c", layer=i, token_start=0, token_end=1, head_start=0, head_end=1,
                        dtype="uint8", nbytes=n, checksum=checksum(memoryview(buf)[:n]))
        loc, evicted = t.append(ChunkKey("ab", i, 0, 1), h, memoryview(buf))
        locs.append((loc, h, evicted))
    t.drop(ChunkKey("ab", 11, 0, 1), locs[11][0])
    t.close()
    t2 = SsdTier(str(tmp_path), 4 << 20, 1 << 20, direct=direct)
    recs, dropped = t2.recover()
    assert dropped == 0 and sorted(r.key.layer for r in recs) == list(range(11))
    out = mmap.mmap(-1, 64 * ALIGN)
    for r in recs:
        assert t2.read_into(r.loc, memoryview(out), r.header.checksum)
        assert out[:r.header.nbytes] == bytes([r.key.layer]) * r.header.nbytes
    t2.close()


def test_journal_compacts_while_running_and_still_recovers(tmp_path, monkeypatch):
    import mmap

    import kvrelay.store.ssd as ssd
    monkeypatch.setattr(ssd, "JOURNAL_COMPACT_MIN", 50)
    t = SsdTier(str(tmp_path), 64 << 20, 8 << 20, direct="off")
    t.recover()
    buf = mmap.mmap(-1, 2 * ALIGN)
    buf[:100] = b"x" * 100
    h = ChunkHeader(compat_hash="c", layer=0, token_start=0, token_end=1, head_start=0, head_end=1, dtype="uint8",
                    nbytes=100, checksum=checksum(memoryview(buf)[:100]))
    for i in range(400):  # nine in ten dropped again: dead frames pile up and get compacted away
        loc, _ = t.append(ChunkKey("ab", i, 0, 1), h, memoryview(buf))
        if i % 10:
            t.drop(ChunkKey("ab", i, 0, 1), loc)
    frames_written = 400 + 360
    size = (tmp_path / "journal.log").stat().st_size
    t.close()
    one = len(ssd.frame(ssd.JEntry("add", ChunkKey("ab", 1, 0, 1).encode().decode(), ssd.Loc(0, 0, 100))))
    assert size < frames_written * one / 2  # compacted at least once
    t2 = SsdTier(str(tmp_path), 64 << 20, 8 << 20, direct="off")
    recs, dropped = t2.recover()
    assert dropped == 0 and sorted(r.key.layer for r in recs) == list(range(0, 400, 10))
    t2.close()
