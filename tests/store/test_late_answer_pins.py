"""A pull the client gave up on (its deadline passed) that the daemon answers late still hands back the pin
the daemon took for it (issue 26): with the next request, not when ``pull_pin_ttl`` (30 s) expires."""

from __future__ import annotations

import time

import pytest
import torch

from store_helpers import COMPAT, Daemon, make_chunk
from kvrelay.store.client import StoreClient, StoreError


@pytest.mark.timeout(90)
def test_a_late_pull_answer_gives_its_pin_back(tmp_path, monkeypatch):
    monkeypatch.setenv("KVRELAY_FAULT_STORE_DELAY_MS", "2000")  # every request but Hello and Ping, 2 s late
    d = Daemon(tmp_path, pool_size="64MiB").start()
    try:
        # local_reads off: the ready chunk is pulled through the daemon, which pins it for the copy
        with StoreClient(d.address, compat_hash=COMPAT, timeout=10, local_reads=False) as c:
            k, h, data = make_chunk(2601, 4096)
            c.reserve("late-1", [(k, h.nbytes)])
            c.publish(k, h, data)
            with pytest.raises(StoreError) as ei:  # gives up after its deadline + the 1 s grace, before the answer
                c.pull(k, torch.empty(4096, dtype=torch.uint8), time.monotonic() + 0.2)
            assert ei.value.code == "timeout"
            c.ping()  # answered after the late pull answer (one daemon thread, in order): that one is read first
            c.ping()  # and this one carries its pin back
            assert c.stats()["pins"] == 0
    finally:
        d.cleanup()
