"""A chunk's typed lifecycle (kvrelay.store.lifecycle): the legal tier and busy transitions, and every
illegal one refused."""

from __future__ import annotations

import pytest

from kvrelay.keys import ChunkKey
from kvrelay.store.lifecycle import Busy, Entry, IllegalTransition, Tier
from kvrelay.store.ssd_format import Loc
from kvrelay.transfer.wire import ChunkHeader

KEY = ChunkKey("ab" * 16, 0, 0, 8)
HEADER = ChunkHeader(compat_hash="c", layer=0, token_start=0, token_end=16, head_start=0, head_end=8,
                     dtype="uint8", nbytes=4096, checksum=7)
LOC = Loc(0, 0, 4096)


def reserved() -> Entry:
    return Entry.reserved(KEY, "k", 4096, 0, request_id="r", namespace="c", deadline=1.0, now=0.0, tenant="")


def test_the_whole_life_of_a_chunk():
    e = reserved()
    assert (e.tier, e.busy, e.ready, e.in_pool, e.in_memory, e.on_ssd) == (Tier.RESERVED, Busy.NONE, False, True,
                                                                           False, False)
    e.begin(Busy.VERIFYING)
    e.end(Busy.VERIFYING)
    e.mark_ready(HEADER, 1.0, verified=False)
    assert (e.tier, e.ready, e.in_memory, e.dirty, e.verified) == (Tier.MEMORY, True, True, True, False)
    e.begin(Busy.SPILLING)
    e.mark_verified()
    e.end(Busy.SPILLING)
    e.gain_ssd(LOC)
    assert (e.tier, e.dirty, e.loc, e.verified) == (Tier.BOTH, False, LOC, True)
    e.lose_memory()
    assert (e.tier, e.offset, e.in_pool) == (Tier.SSD, -1, False)
    e.begin(Busy.PROMOTING, 8192)
    assert e.promote_to == 8192 and e.is_busy
    e.end(Busy.PROMOTING)
    e.gain_memory(8192)
    assert (e.tier, e.offset, e.promote_to) == (Tier.BOTH, 8192, -1)
    e.lose_ssd()
    assert (e.tier, e.loc) == (Tier.MEMORY, None)


def test_recovered_entries_start_on_ssd():
    e = Entry.recovered(KEY, "k", HEADER, LOC, 0.0, "t")
    assert (e.tier, e.nbytes, e.namespace, e.tenant) == (Tier.SSD, 4096, "c", "t")
    assert Entry.recovered(KEY, "k", HEADER, LOC, 0.0, "").serial != e.serial  # each entry its own serial


@pytest.mark.parametrize("move", [
    lambda e: e.gain_ssd(LOC),  # RESERVED has nothing to write
    lambda e: e.lose_memory(),
    lambda e: e.gain_memory(0),
    lambda e: e.begin(Busy.SPILLING),
    lambda e: e.begin(Busy.PROMOTING, 0),
    lambda e: e.end(Busy.VERIFYING),  # never began
    lambda e: e.begin(Busy.NONE),
    lambda e: e.mark_verified(),
])
def test_illegal_moves_of_a_reserved_chunk_raise(move):
    e = reserved()
    with pytest.raises(IllegalTransition, match="chunk k"):
        move(e)
    assert (e.tier, e.busy) == (Tier.RESERVED, Busy.NONE)  # and change nothing


def test_busy_excludes_everything_else():
    e = reserved()
    e.begin(Busy.VERIFYING)
    with pytest.raises(IllegalTransition, match="while VERIFYING"):
        e.begin(Busy.VERIFYING)
    with pytest.raises(IllegalTransition, match="not busy, it is RESERVED and VERIFYING"):
        e.mark_ready(HEADER, 1.0, verified=True)
    e.end(Busy.VERIFYING)
    e.mark_ready(HEADER, 1.0, verified=True)
    with pytest.raises(IllegalTransition, match="needs tier SSD"):
        e.begin(Busy.PROMOTING, 0)
    with pytest.raises(IllegalTransition, match="needs tier BOTH"):
        e.lose_memory()  # MEMORY is the only copy: it is removed from the index, never moved to "nowhere"
    with pytest.raises(IllegalTransition, match="starts RESERVED"):
        Entry(KEY, "k", 1, Tier.MEMORY, offset=0)
