"""The tcp transport's cancel: once ``cancel()`` returns, nothing more of that read lands in the caller's
memory; the rest of its reply is drained (into a scratch buffer) by the next transfer on the same socket,
which completes byte-exact."""

from __future__ import annotations

import numpy as np

from kvrelay.transfer import create_transport
from kvrelay.transfer.base import Desc, XferState

from waiting import wait_until

MIB = 1 << 20


def test_cancelled_read_lands_nothing_after_cancel_and_the_socket_stays_usable():
    with create_transport("tcp", "srv", "compat") as srv, \
            create_transport("tcp", "cli", "compat", direct_sockets=1) as cli:  # one socket: the next read queues behind
        remote_info, rview = srv.alloc(64 * MIB)
        remote = np.frombuffer(rview, np.uint8)
        remote[:] = 7
        peer = cli.connect(srv.address, timeout=20)
        a, aview = cli.alloc(64 * MIB)
        b, bview = cli.alloc(MIB)
        local, other = np.frombuffer(aview, np.uint8), np.frombuffer(bview, np.uint8)
        for _ in range(5):  # a loaded machine may receive all 64 MiB in one short wait: then read again
            local[:] = 0
            h = cli.read(peer, [Desc(a.region_id, 0, remote_info.region_id, 0, 64 * MIB)], timeout=30)

            def partly_landed(h=h) -> bool:
                h.wait(0.0005)  # receive for a moment (only a waiting thread receives: none until cancel())
                return h.done or bool(local[::MIB].any())
            wait_until(partly_landed, 20, "the first bytes of the read")
            if not h.done:
                break
            h.release()
        h.cancel()
        snapshot = local.copy()
        with cli.read(peer, [Desc(b.region_id, 0, remote_info.region_id, 0, MIB)], timeout=30) as h2:
            h2.result()  # drains what was left of the cancelled reply first
        assert (other == 7).all()
        assert h.state is XferState.CANCELLED, h.state  # 64 MiB take far longer than the first few receives
        assert not (snapshot == 7).all(), "the read finished before the cancel: nothing was tested"
        assert np.array_equal(local, snapshot), "bytes of the cancelled read landed after cancel() returned"
        h.release()
        assert cli.open_handles() == 0
