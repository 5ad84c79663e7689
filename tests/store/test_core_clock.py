"""The store core driven by a ManualClock (no daemon, no sleeping): leases, pull pins, reservations and idle
chunks expire once the clock passes their deadline, and not before."""

from __future__ import annotations

import uuid
from typing import Callable, Iterator

import pytest
import torch

from store_helpers import COMPAT, make_chunk
from kvrelay.keys import ChunkKey
from kvrelay.store.clock import ManualClock
from kvrelay.store.config import StoreConfig
from kvrelay.store.core import StoreCore
from kvrelay.store.errors import OpError, StoreCode
from kvrelay.store.pool import unlink_pool
from kvrelay.transfer.wire import ChunkHeader

SZ = 200 * 1024  # a 1 MiB pool holds 5


@pytest.fixture
def core_at() -> Iterator[Callable[..., tuple[StoreCore, ManualClock]]]:
    """``core_at(**StoreConfig options)``: a core on a fresh 1 MiB pool with a ManualClock (closed at teardown)."""
    made: list[StoreCore] = []
    name = f"kvrelay-clock-{uuid.uuid4().hex[:10]}"

    def make(**opts) -> tuple[StoreCore, ManualClock]:
        clock = ManualClock()
        opts = {"pool_size": "1MiB", "max_chunk_bytes": "256KiB", **opts}
        core = StoreCore(StoreConfig(port=0, pool_name=name, directory=False, **opts), clock)
        made.append(core)
        return core, clock

    yield make
    for c in made:
        c.close()
    unlink_pool(name)


def publish(core: StoreCore, key: ChunkKey, header: ChunkHeader, data: torch.Tensor, ttl: float = 60.0) -> None:
    [slot] = core.reserve(f"req-{key.block_hash[-6:]}", [key], [data.numel()], ttl, COMPAT)
    core.pool.view[slot.offset:slot.offset + data.numel()] = data.numpy().tobytes()
    assert core.commit(key, header, COMPAT, verify=True)


def test_leases_expire_on_the_clock_then_eviction_makes_room(core_at):
    core, clock = core_at()
    chunks = [make_chunk(100 + i, SZ) for i in range(5)]
    for k, h, d in chunks:
        publish(core, k, h, d)
    core.lease([k for k, _, _ in chunks], ttl=1.0)
    extra = make_chunk(200, SZ)
    with pytest.raises(OpError, match="pinned") as exc:
        core.reserve("r", [extra[0]], [SZ], 60.0, COMPAT)
    assert exc.value.code is StoreCode.FULL
    clock.advance(0.9)
    core.sweep()
    assert core.stats()["pins"] == 5 and core.stats()["lease_expiries"] == 0  # not yet
    clock.advance(0.2)
    core.sweep()
    s = core.stats()
    assert s["pins"] == 0 and s["lease_expiries"] == 5
    publish(core, *extra)  # the LRU chunk makes room now
    assert core.lookup([extra[0]]) == 1 and core.lookup([chunks[0][0]]) == 0
    assert core.stats()["evictions_memory"] == 1 and core.stats()["admission_refusals"] == 1


def test_pull_pin_expires_after_pull_pin_ttl(core_at):
    core, clock = core_at(pull_pin_ttl=5.0)
    k, h, d = make_chunk(300, SZ)
    publish(core, k, h, d)
    got = core.acquire(k)
    assert got is not None and got[1] == h
    clock.advance(4.9)
    core.sweep()
    assert core.stats()["pins"] == 1
    clock.advance(0.2)
    core.sweep()
    assert core.stats()["pins"] == 0 and core.stats()["pull_pin_expiries"] == 1


def test_reservation_expires_and_its_commit_is_refused(core_at):
    core, clock = core_at()
    k, h, _ = make_chunk(400, SZ)
    core.reserve("gone", [k], [SZ], 0.4, COMPAT)
    clock.advance(0.3)
    core.sweep()
    assert core.stats()["reserved_chunks"] == 1
    clock.advance(0.2)
    core.sweep()
    s = core.stats()
    assert s["reserved_chunks"] == 0 and s["reservation_expiries"] == 1 and s["pool_used_bytes"] == 0
    with pytest.raises(OpError, match="no reservation") as exc:
        core.commit(k, h, COMPAT, verify=False)
    assert exc.value.code is StoreCode.NOT_FOUND


def test_chunk_ttl_counts_from_the_last_use(core_at):
    core, clock = core_at(chunk_ttl=1.0)
    k, h, d = make_chunk(500, SZ)
    publish(core, k, h, d)
    clock.advance(0.8)
    got = core.acquire(k)  # a pull is a use: the idle time starts again
    assert got is not None
    core.unpin([got[0].pin])
    clock.advance(0.8)
    core.sweep()
    assert core.lookup([k]) == 1
    clock.advance(0.3)
    core.sweep()
    s = core.stats()
    assert core.lookup([k]) == 0 and s["ttl_expiries"] == 1 and s["pool_used_bytes"] == 0


def test_a_pinned_chunk_outlives_its_ttl_until_unpinned(core_at):
    core, clock = core_at(chunk_ttl=1.0)
    k, h, d = make_chunk(600, SZ)
    publish(core, k, h, d)
    [pid] = core.lease([k], ttl=100.0)
    clock.advance(10.0)
    core.sweep()
    assert core.lookup([k]) == 1  # leased: never expired
    core.unpin([pid])
    core.sweep()
    assert core.lookup([k]) == 0 and core.stats()["ttl_expiries"] == 1
