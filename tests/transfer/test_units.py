"""Unit tests of the pieces under the transports: frame planning, the handle state machine, the
nvlink IPC-handle codec, shm's zero-copy mapping and registry functions (CPU only, no peers needed
except where a second endpoint in this process is enough)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from kvrelay.transfer import available_transports, create_transport
from kvrelay.transfer.base import Desc, XferState
from kvrelay.transfer.frames import plan_frames
from kvrelay.transfer.handle import Handle
from kvrelay.transfer.nvlink import decode_ipc_handle, encode_ipc_handle
from waiting import wait_until

pytestmark = pytest.mark.timeout(60)


def test_plan_frames_covers_every_byte_once():
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(0, 3 << 20, 50)] + [1, 5, 70_000, 0, 64 << 10]
    plan = plan_frames(lengths, frame_bytes=1 << 20, small_bytes=64 << 10)
    seen = {i: [] for i in range(len(lengths))}
    for frame in plan:
        assert sum(p.length for p in frame) <= 1 << 20
        if len(frame) > 1:
            assert all(p.length < 64 << 10 for p in frame)
        for p in frame:
            seen[p.desc].append((p.offset, p.length))
    for i, n in enumerate(lengths):
        pos = 0
        for off, ln in sorted(seen[i]):
            assert off == pos
            pos += ln
        assert pos == n
    with pytest.raises(ValueError):
        plan_frames([1], frame_bytes=0)


def test_handle_reaches_terminal_at_deadline_without_anyone_driving_it():
    h = Handle(peer="p", op="read", nbytes=10, timeout=0.05)
    assert h.state is XferState.PENDING
    t0 = time.monotonic()
    assert h.wait() is XferState.FAILED
    assert 0.04 < time.monotonic() - t0 < 1
    assert "deadline" in h.error


def test_handle_transitions_are_final_and_release_is_idempotent():
    freed, aborted = [], []
    h = Handle(peer="p", op="write", nbytes=1, timeout=5, free=lambda: freed.append(1),
               abort=lambda s: aborted.append(s))
    h.set_transferring()
    assert h.state is XferState.TRANSFERRING
    threading.Timer(0.02, h.cancel).start()
    assert h.wait(2) is XferState.CANCELLED
    assert not h.finish(XferState.DONE)
    assert h.state is XferState.CANCELLED and aborted == [XferState.CANCELLED]
    h.release()
    h.release()
    assert freed == [1]
    with pytest.raises(ValueError):
        Handle(peer="p", op="read", nbytes=1, timeout=0)


def test_nvlink_ipc_handle_codec_round_trip_and_bounds():
    shared = (0, b"\x01" * 64, 4096, 0, b"rc-handle", 8, b"\x02" * 64, True)
    meta = encode_ipc_handle(shared, 1024, 2048)
    h = decode_ipc_handle(meta)
    assert (h.device, h.handle, h.storage_bytes, h.tensor_offset, h.nbytes) == (0, b"\x01" * 64, 4096, 1024, 2048)
    assert h.event_sync_required is True and h.ref_counter_offset == 8
    with pytest.raises(ValueError, match="outside the shared storage"):
        encode_ipc_handle(shared, 4000, 200)
    with pytest.raises(ValueError, match="8 fields"):
        encode_ipc_handle(shared[:5], 0, 1)
    with pytest.raises(ValueError, match="malformed"):
        decode_ipc_handle(b"\xff\x00garbage")


def test_available_transports_reports_reasons():
    avail = available_transports()
    assert set(avail) == {"shm", "tcp", "nixl", "nvlink"}
    assert avail["shm"] is None and avail["tcp"] is None
    if avail["nvlink"] is not None:
        assert "CUDA" in avail["nvlink"]
        with pytest.raises(RuntimeError, match="not available"):
            create_transport("nvlink", "x", "h")
    with pytest.raises(ValueError, match="unknown transport"):
        create_transport("carrier-pigeon", "x", "h")


def test_shm_map_remote_is_zero_copy_and_plain_memory_is_local_only():
    import os

    from kvrelay.transfer.shm import segments
    mine = lambda: [s for s in segments() if s.startswith(f"kvrelay-xfer-{os.getpid()}-")]  # noqa: E731
    before = mine()
    with create_transport("shm", "owner", "h") as a, create_transport("shm", "user", "h") as b:
        info, view = a.alloc(1 << 16)
        plain = a.register(np.zeros(100, np.uint8))
        peer = b.connect(a.address, timeout=10)
        remote = b.map_remote(peer, info.region_id)
        view[:5] = b"hello"
        assert bytes(remote[:5]) == b"hello"  # the same memory, no copy
        remote[10:13] = b"abc"
        assert bytes(view[10:13]) == b"abc"
        local, _ = b.alloc(100)
        with pytest.raises(ValueError, match="alloc"):
            b.read(peer, [Desc(local.region_id, 0, plain.region_id, 0, 10)])
        del remote
        assert len(mine()) == len(before) + 2
    assert mine() == before


@pytest.mark.parametrize("name", [n for n, r in available_transports().items() if r is None])
def test_closed_endpoint_refuses_work(name):
    ep = create_transport(name, "short-lived", "h")
    ep.close()
    ep.close()
    with pytest.raises(RuntimeError, match="closed"):
        ep.alloc(10)


def test_shm_large_transfer_progresses_after_a_short_wait():
    """A waiter copies a large transfer's steps itself; one whose timeout ends first hands the rest back to
    the copy thread, so the transfer still completes with nobody waiting (byte-exact)."""
    n = 64 << 20
    with create_transport("shm", "owner", "h") as a, create_transport("shm", "user", "h") as b:
        remote, rview = a.alloc(n)
        src = np.frombuffer(rview, np.uint8)
        src[:] = np.random.default_rng(3).integers(0, 256, n, dtype=np.uint8)
        local, lview = b.alloc(n)
        peer = b.connect(a.address, timeout=10)
        h = b.read(peer, [Desc(local.region_id, 0, remote.region_id, 0, n)], timeout=60)
        h.wait(0.0005)  # returns after at most a step or so, usually before the end
        # nobody waits on the handle: the copy thread must finish it (50 s: a hang guard, not a speed check)
        wait_until(lambda: h.done, 50, "the copy thread finishing a transfer nobody waits on")
        assert h.state is XferState.DONE, h
        assert np.array_equal(np.frombuffer(lview, np.uint8), src)
        h.release()
        assert b.open_handles() == 0
