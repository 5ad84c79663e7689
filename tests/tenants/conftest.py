"""Fixtures: ``make_core`` (tenant_helpers.py has the helpers)."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from kvrelay.store.config import StoreConfig  # noqa: E402
from kvrelay.store.core import StoreCore  # noqa: E402
from kvrelay.store.pool import unlink_pool  # noqa: E402


@pytest.fixture
def make_core(tmp_path: Path) -> Iterator[Callable[..., StoreCore]]:
    """``make_core(**StoreConfig options)``: a core on a fresh pool (closed at teardown); ``ssd=True`` puts its
    SSD tier in tmp_path/ssd (the same directory for every core of a test: a later one recovers it)."""
    made: list[StoreCore] = []
    name = f"kvrelay-tenants-{uuid.uuid4().hex[:10]}"

    def make(ssd: bool = False, **opts) -> StoreCore:
        opts.setdefault("pool_size", "4MiB")
        opts.setdefault("max_chunk_bytes", "256KiB")
        if ssd:
            opts = {"ssd_dir": str(tmp_path / "ssd"), "ssd_size": "8MiB", "ssd_segment_size": "1MiB",
                    "spill_max_delay": 0.0, "ssd_direct": "off", **opts}
        core = StoreCore(StoreConfig(port=0, pool_name=name, directory=False, **opts))
        made.append(core)
        return core

    yield make
    for c in made:
        if not c.closing:
            c.close()
    unlink_pool(name)
