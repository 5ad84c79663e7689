"""Fixtures: ``make_core`` (tenant_helpers.py has the helpers)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from kvrelay.store.clock import Clock
from kvrelay.store.config import StoreConfig
from kvrelay.store.core import StoreCore
from kvrelay.store.pool import unlink_pool


@pytest.fixture
def make_core(tmp_path: Path) -> Iterator[Callable[..., StoreCore]]:
    """``make_core(**StoreConfig options)``: a core on a fresh pool (closed at teardown); ``ssd=True`` puts its
    SSD tier in tmp_path/ssd (the same directory for every core of a test: a later one recovers it);
    ``clock``: the core's clock (a ManualClock lets a test advance time for TTLs and leases)."""
    made: list[StoreCore] = []
    name = f"kvrelay-tenants-{uuid.uuid4().hex[:10]}"

    def make(ssd: bool = False, clock: Clock | None = None, **opts) -> StoreCore:
        opts.setdefault("pool_size", "4MiB")
        opts.setdefault("max_chunk_bytes", "256KiB")
        if ssd:
            opts = {"ssd_dir": str(tmp_path / "ssd"), "ssd_size": "8MiB", "ssd_segment_size": "1MiB",
                    "spill_max_delay": 0.0, "ssd_direct": "off", **opts}
        core = StoreCore(StoreConfig(port=0, pool_name=name, directory=False, **opts), clock)
        made.append(core)
        return core

    yield make
    for c in made:
        if not c.closing:
            c.close()
    unlink_pool(name)
