"""Fixtures for the transport conformance suite: real peer processes on 127.0.0.1, killed in teardown."""

from __future__ import annotations

import numpy as np
import pytest

from kvrelay.transfer import create_transport
from xfer_peers import COMPAT, MIB, PeerProc, spawn_peer, transport_params


@pytest.fixture(scope="module", params=transport_params())
def transport_name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def peer(transport_name):
    p = spawn_peer(transport_name)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def endpoint(transport_name):
    ep = create_transport(transport_name, "local", COMPAT)
    yield ep
    ep.close()


@pytest.fixture(scope="module")
def local(endpoint):
    """Two local regions: 80 MiB for reads/writes, 80 MiB for read-backs."""
    a, va = endpoint.alloc(80 * MIB)
    b, vb = endpoint.alloc(80 * MIB)
    return {"a": (a.region_id, np.frombuffer(va, np.uint8)), "b": (b.region_id, np.frombuffer(vb, np.uint8))}


@pytest.fixture(scope="module")
def connected(endpoint, peer):
    return endpoint.connect(peer.address, timeout=30)


@pytest.fixture
def fresh_peer(transport_name):
    """A peer of its own for tests that kill or restart it."""
    procs: list[PeerProc] = []

    def make(name: str = "victim", seed: int = 7, sizes: tuple[int, ...] = (64 * MIB, MIB)) -> PeerProc:
        p = spawn_peer(transport_name, name=name, seed=seed, sizes=sizes)
        procs.append(p)
        return p

    yield make
    for p in procs:
        p.kill()
