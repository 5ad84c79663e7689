"""NvlinkTransport's own logic on CPU: two real endpoints in this process (real handshake, descriptors, handles),
with torch.cuda replaced by a recording fake and the two CUDA-only steps (sharing a tensor, opening a handle)
replaced by a registry of CPU tensors, so copies are real byte copies.  Checks the stream ordering per
transfer, one open per peer region, the Unmap of a deregistration, deferred unmapping under a copy in flight,
and a sticky CUDA error failing the handle (issue 14, findings 2, 6, 8).  Sharing and opening themselves are
covered by test_cuda_ipc.py (the IPC counter policy) and on a GPU by test_nvlink_gpu.py / gpu_selfcheck."""

from __future__ import annotations

import contextlib
import itertools
import types

import pytest
import torch

from kvrelay.transfer import nvlink
from kvrelay.transfer.base import Desc, TransferError, XferState
from kvrelay.transfer.buffers import LocalRegion
from waiting import wait_until

pytestmark = pytest.mark.timeout(60)
REGISTRY: dict[bytes, torch.Tensor] = {}
_ids = itertools.count(1)


class FakeCuda:
    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.complete = True  # events pass as soon as they are recorded
        self.error: str | None = None
        self.events: list = []
        self.caller = types.SimpleNamespace(name="caller", wait_event=lambda ev: self.log.append(("wait", "caller", ev.n)))
        self.current = self.caller

    def install(self, mp) -> None:
        for name in ("Stream", "Event", "current_stream", "stream", "current_device", "device_count",
                     "get_device_properties"):
            mp.setattr(torch.cuda, name, getattr(self, name))
        mp.setattr(nvlink, "unavailable_reason", lambda: None)

    def Stream(self, device):  # noqa: N802
        return types.SimpleNamespace(name="copy", wait_event=lambda ev: self.log.append(("wait", "copy", ev.n)))

    def Event(self):  # noqa: N802
        cuda = self

        class Ev:
            n = len(self.events) + 1

            def record(self, stream) -> None:
                cuda.log.append(("record", self.n, stream.name))
                self.passed = cuda.complete

            def query(self) -> bool:
                if cuda.error:
                    raise RuntimeError(cuda.error)
                return self.passed

            def synchronize(self) -> None:
                self.passed = True
        ev = Ev()
        self.events.append(ev)
        return ev

    def current_stream(self, device=None):
        return self.current

    @contextlib.contextmanager
    def stream(self, s):
        prev, self.current = self.current, s
        try:
            yield
        finally:
            self.current = prev

    def current_device(self) -> int:
        return 0

    def device_count(self) -> int:
        return 1

    def get_device_properties(self, i):
        return types.SimpleNamespace(uuid="fake-gpu-0")


class CpuNvlink(nvlink.NvlinkTransport):
    """Only sharing and opening differ: a registry of CPU tensors stands in for CUDA IPC."""

    def _make_region(self, region_id: int, buf) -> LocalRegion:
        handle = b"h%d" % next(_ids)
        REGISTRY[handle] = buf
        meta = nvlink.encode_ipc_handle((0, handle, buf.numel(), 0, b"rc", 0, b"", False), 0, buf.numel(), "fake-gpu-0")
        return LocalRegion(region_id, memoryview(b""), buf.numel(), device="cuda:0", meta=meta, keep=[buf],
                           device_obj=buf)

    def _open_region(self, meta: bytes) -> torch.Tensor:
        h = nvlink.decode_ipc_handle(meta)
        return REGISTRY[h.handle][h.tensor_offset:h.tensor_offset + h.nbytes]


@pytest.fixture
def pair(monkeypatch):
    cuda = FakeCuda()
    cuda.install(monkeypatch)
    owner, user = CpuNvlink("owner", "h"), CpuNvlink("user", "h")
    try:
        yield cuda, owner, user
    finally:
        user.close()
        owner.close()


def _regions(owner, user):
    theirs = torch.arange(4096, dtype=torch.int64).to(torch.uint8)
    other = torch.zeros(4096, dtype=torch.uint8)
    r1, r2 = owner.register(theirs), owner.register(other)
    mine = torch.zeros(4096, dtype=torch.uint8)
    lr = user.register(mine)
    peer = user.connect(owner.address, timeout=10)
    return theirs, other, mine, r1.region_id, r2.region_id, lr.region_id, peer


def test_read_write_are_byte_exact_and_ordered_with_the_callers_stream(pair):
    cuda, owner, user = pair
    theirs, other, mine, r1, r2, lr, peer = _regions(owner, user)
    del cuda.log[:]
    with user.read(peer, [Desc(lr, 0, r1, 100, 1000), Desc(lr, 2000, r1, 0, 10)], timeout=10) as h:
        h.result()
    assert torch.equal(mine[:1000], theirs[100:1100]) and torch.equal(mine[2000:2010], theirs[:10])
    # caller's stream -> copy stream, copies, done event on the copy stream -> the caller's stream waits on it
    assert cuda.log == [("record", 1, "caller"), ("wait", "copy", 1), ("record", 2, "copy"), ("wait", "caller", 2)]
    mine[:64] = 9
    with user.write(peer, [Desc(lr, 0, r2, 0, 64)], timeout=10) as h:
        h.result()
    assert bool((other[:64] == 9).all()) and not bool(other[64:].any())
    assert user.open_maps() == 2 and user._maps.opens == 2  # one open per peer region, not per transfer
    for _ in range(3):
        with user.read(peer, [Desc(lr, 0, r1, 0, 8)], timeout=10) as h:
            h.result()
    assert user._maps.opens == 2 and user.open_handles() == 0


def test_deregister_unmaps_at_the_peer_and_refuses_its_descriptors(pair):
    cuda, owner, user = pair
    _, _, _, r1, r2, lr, peer = _regions(owner, user)
    for r in (r1, r2):
        with user.read(peer, [Desc(lr, 0, r, 0, 8)], timeout=10) as h:
            h.result()
    owner.deregister(r1)
    wait_until(lambda: user.open_maps() == 1, 10, "the deregistered region unmapped at the user")
    assert user._maps.closes == 1
    with pytest.raises(ValueError):
        user.read(peer, [Desc(lr, 0, r1, 0, 8)])
    with user.read(peer, [Desc(lr, 0, r2, 0, 8)], timeout=10) as h:  # negative control
        h.result()


def test_a_lost_peer_is_unmapped_only_after_its_copy_in_flight_ends(pair):
    cuda, owner, user = pair
    _, _, _, r1, _, lr, peer = _regions(owner, user)
    cuda.complete = False
    h = user.read(peer, [Desc(lr, 0, r1, 0, 64)], timeout=10)
    assert h.state is XferState.TRANSFERRING
    user.disconnect(peer)  # the peer is lost while the copy runs on the GPU
    assert h.wait(1) is XferState.FAILED
    assert user.open_maps() == 1 and user._maps.closes == 0  # not closed under the running copy
    for ev in cuda.events:
        ev.passed = True
    user._copies.reap()
    assert user.open_maps() == 0 and user._maps.closes == 1
    h.release()


def test_a_sticky_cuda_error_fails_the_handle_with_a_transfer_error(pair):
    cuda, owner, user = pair
    _, _, _, r1, _, lr, peer = _regions(owner, user)
    cuda.complete = False
    h = user.read(peer, [Desc(lr, 0, r1, 0, 64)], timeout=10)
    cuda.error = "CUDA error: an illegal memory access was encountered\nmore"
    assert h.wait(5) is XferState.FAILED  # not a RuntimeError out of wait()
    with pytest.raises(TransferError, match="illegal memory access.*unusable"):
        h.result()
    cuda.error = None
    h.release()
