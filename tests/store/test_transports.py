"""Publish and pull across processes through each remote transport the machine supports (the store
registers its pool with each; clients read/write descriptors one-sided).  ``shm`` (mapped pool) is
covered by test_publish_pull.py.  Also: the store serves STORE_TRANSPORTS only, and nvlink (engine to
engine, device memory) is refused by name by the config, the client and the launcher."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import time

import pytest
import torch

from childenv import child_env
from store_helpers import COMPAT, Daemon, make_chunk
from kvrelay.store.client import StoreClient, StoreError
from kvrelay.store.config import StoreConfig
from kvrelay.transfer import ENGINE_TRANSPORTS, STORE_TRANSPORTS, available_transports

WORKER = str(Path(__file__).parent / "store_worker.py")
# the transports the store serves and this machine has: never nvlink, even on a CUDA host (its register
# refuses the host pool, so a daemon asked for it would exit and fail every case of this module)
REMOTE = [t for t, why in available_transports().items() if why is None and t in STORE_TRANSPORTS and t != "shm"]
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
@pytest.mark.parametrize("transport", [t for t in STORE_TRANSPORTS if t != "shm"])
def test_cross_process_through_transport(multi_daemon, transport):
    if transport in UNAVAILABLE:
        pytest.skip(f"{transport}: {UNAVAILABLE[transport]}")
    assert transport in multi_daemon.info["endpoints"]
    base = str({"tcp": 4000, "nixl": 5000}[transport])
    # the puller starts first and waits; publisher and puller each run their own transport endpoint;
    # then this process reads the mapped pool (shm) to check what the transport wrote into it
    pull = subprocess.Popen([sys.executable, WORKER, "pull", multi_daemon.address, transport, base, "6", "300007"],
                            env=child_env())
    pub = subprocess.Popen([sys.executable, WORKER, "publish", multi_daemon.address, transport, base, "6", "300007"],
                           env=child_env())
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


def test_transport_lists_are_one_source():
    assert set(STORE_TRANSPORTS) < set(ENGINE_TRANSPORTS) == set(available_transports())
    assert "nvlink" in ENGINE_TRANSPORTS and "nvlink" not in STORE_TRANSPORTS


@pytest.mark.parametrize("value", ["nvlink", "shm,nvlink", ["tcp", "nvlink"]])
def test_store_config_refuses_nvlink_by_name(value):
    with pytest.raises(ValueError, match="'nvlink' cannot reach the store.*host memory.*shm"):
        StoreConfig(port=0, transports=value)
    assert StoreConfig(port=0, transports="shm,tcp").transports == ["shm", "tcp"]  # negative control


def test_client_and_launcher_refuse_nvlink_before_connecting():
    # no daemon at this address: the refusal must come from the transport check, not a timeout
    with pytest.raises(ValueError, match="'nvlink' cannot reach the store"):
        StoreClient("tcp://127.0.0.1:1", transport="nvlink", compat_hash=COMPAT)
    with pytest.raises(ValueError, match="'carrier' is not a store transport; choose one of shm, tcp, nixl"):
        StoreClient("tcp://127.0.0.1:1", transport="carrier", compat_hash=COMPAT)
    from kvrelay.launcher import build_parser, check_args
    assert "'nvlink' cannot reach the store" in check_args(build_parser().parse_args(["--transport", "nvlink"]))
    assert check_args(build_parser().parse_args(["--transport", "shm"])) is None


def test_unserved_transport_is_refused(daemon):
    """A store transport the daemon was not started with is refused by the daemon, naming what it serves."""
    with pytest.raises(StoreError, match="not served"):
        StoreClient(daemon.address, transport="tcp", compat_hash=COMPAT)
