"""Publish and pull across processes through each remote transport the machine supports (the store
registers its pool with each; clients read/write descriptors one-sided).  ``shm`` (mapped pool) is
covered by test_publish_pull.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import time

import pytest
import torch

from store_helpers import COMPAT, Daemon, make_chunk
from kvrelay.store.client import StoreClient, StoreError
from kvrelay.transfer import available_transports

WORKER = str(Path(__file__).parent / "store_worker.py")
REMOTE = [t for t, why in available_transports().items() if why is None and t != "shm"]
UNAVAILABLE = {t: why for t, why in available_transports().items() if why is not None}


@pytest.fixture(scope="module")
def multi_daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("store-tx"), pool_size="64MiB", max_chunk_bytes="8MiB",
               transports=",".join(["shm", *REMOTE]))
    try:
        yield d.start(timeout=60)
    finally:
        d.cleanup()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["tcp", "nixl", "nvlink"])
def test_cross_process_through_transport(multi_daemon, transport):
    if transport in UNAVAILABLE:
        pytest.skip(f"{transport}: {UNAVAILABLE[transport]}")
    assert transport in multi_daemon.info["endpoints"]
    base = str({"tcp": 4000, "nixl": 5000, "nvlink": 6000}[transport])
    # the puller starts first and waits; publisher and puller each run their own transport endpoint;
    # then this process reads the mapped pool (shm) to check what the transport wrote into it
    pull = subprocess.Popen([sys.executable, WORKER, "pull", multi_daemon.address, transport, base, "6", "300007"])
    pub = subprocess.Popen([sys.executable, WORKER, "publish", multi_daemon.address, transport, base, "6", "300007"])
    try:
        assert pub.wait(timeout=90) == 0
        assert pull.wait(timeout=90) == 0
        with StoreClient(multi_daemon.address, compat_hash=COMPAT) as c:  # what landed in the pool
            out = torch.empty(300007, dtype=torch.uint8)
            for s in range(int(base), int(base) + 6):
                k, h, data = make_chunk(s, 300007)
                assert c.pull(k, out, time.monotonic() + 5) == h and torch.equal(out, data)
    finally:
        for p in (pull, pub):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_unserved_transport_is_refused(multi_daemon):
    with pytest.raises(StoreError, match="not served"):
        StoreClient(multi_daemon.address, transport="nvlink" if "nvlink" not in REMOTE else "carrier",
                    compat_hash=COMPAT)
