"""nvlink (CUDA IPC) between two processes on one GPU: byte-exact reads and writes, zero-copy mapping,
a bad descriptor, and the peer's death.  Skipped without CUDA (the IPC-handle codec is tested on CPU in
test_units.py).  NOTE: written without access to a GPU; it has not run yet."""

from __future__ import annotations


import numpy as np
import pytest

from kvrelay.transfer import available_transports, create_transport
from kvrelay.transfer.base import Desc, XferState
from xfer_peers import COMPAT, MIB, spawn_peer
from waiting import wait_until

REASON = available_transports()["nvlink"]
pytestmark = [pytest.mark.skipif(REASON is not None, reason=f"nvlink: {REASON}"), pytest.mark.timeout(120)]


def test_nvlink_read_write_map_and_peer_death():
    import torch
    peer_proc = spawn_peer("nvlink", name="gpu-peer", seed=3, sizes=(4 * MIB, MIB))
    try:
        with create_transport("nvlink", "gpu-local", COMPAT) as ep:
            peer = ep.connect(peer_proc.address, timeout=30)
            info, local = ep.alloc(8 * MIB)
            rng = np.random.default_rng(0)
            descs = []
            for i, loff in enumerate(rng.permutation(16)):
                n = int(rng.integers(1, 200_000))
                descs.append(Desc(info.region_id, int(loff) * 256 * 1024, peer_proc.regions[0], i * 200_000, n))
            with ep.read(peer, descs, timeout=30) as h:
                h.result()
            src = peer_proc.expected(0)
            host = local.cpu().numpy()
            for d in descs:
                assert np.array_equal(host[d.local_offset:d.local_offset + d.length],
                                      src[d.remote_offset:d.remote_offset + d.length])
            local[:MIB] = torch.arange(MIB, device=local.device, dtype=torch.int64).to(torch.uint8)
            with ep.write(peer, [Desc(info.region_id, 0, peer_proc.regions[1], 0, MIB)], timeout=30) as h:
                h.result()
            mapped = ep.map_remote(peer, peer_proc.regions[1])
            assert torch.equal(mapped, local[:MIB])
            assert ep.open_maps() == 2  # one open per peer region, however many transfers used it
            with pytest.raises(ValueError):
                ep.read(peer, [Desc(info.region_id, 0, peer_proc.regions[1], MIB - 1, 2)])
            peer_proc.kill()
            wait_until(lambda: peer not in ep.peers(), 5, "the killed peer dropped")
            with ep.read(peer, [Desc(info.region_id, 0, peer_proc.regions[1], 0, 16)], timeout=2) as h:
                assert h.wait() is XferState.FAILED and h.error
            assert ep.open_handles() == 0
            wait_until(lambda: ep.open_maps() == 0, 5, "the dead peer's regions unmapped")
    finally:
        peer_proc.kill()
