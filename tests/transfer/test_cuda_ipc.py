"""The CUDA logic under nvlink and NIXL VRAM, on CPU with recording fakes of torch.cuda (issue 14, findings 2,
6, 7, 8): stream ordering, refcounted IPC maps, deferred close under copies in flight, sticky CUDA errors,
GPU matching by UUID, torch's IPC counter policy, and the Unmap a deregistration sends to peers.  The real
CUDA path runs in the GPU check (kvrelay.diagnostics.gpu_selfcheck)."""

from __future__ import annotations

import contextlib
import types

import pytest

from kvrelay.transfer import create_transport
from kvrelay.transfer.base import Desc
from kvrelay.transfer.cuda_ipc import CopyStream, IpcMaps, device_index_for_uuid, host_wait_for_stream, local_uuids
from kvrelay.transfer.nvlink import NO_IPC_COUNTER, NvlinkTransport, encode_ipc_handle
from kvrelay.transfer.shm import ShmTransport
from waiting import wait_until

pytestmark = pytest.mark.timeout(60)


class FakeCuda:
    """Records, in order, what the code asks of torch.cuda; events complete when the test says so."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.caller = FakeStream(self, "caller")
        self.current = self.caller
        self.n = 0

    def Stream(self, device):  # noqa: N802 - torch.cuda's name
        return FakeStream(self, "copy")

    def Event(self):  # noqa: N802
        self.n += 1
        return FakeEvent(self, f"ev{self.n}")

    def current_stream(self, device=None):
        return self.current

    @contextlib.contextmanager
    def stream(self, s):
        prev, self.current = self.current, s
        self.log.append(("enter", s.name))
        try:
            yield
        finally:
            self.current = prev
            self.log.append(("exit", s.name))


class FakeStream:
    def __init__(self, cuda: FakeCuda, name: str) -> None:
        self.cuda, self.name = cuda, name

    def wait_event(self, ev) -> None:
        self.cuda.log.append(("wait", self.name, ev.name))


class FakeEvent:
    def __init__(self, cuda: FakeCuda, name: str) -> None:
        self.cuda, self.name, self.done, self.error = cuda, name, False, None

    def record(self, stream) -> None:
        self.cuda.log.append(("record", self.name, stream.name))

    def query(self) -> bool:
        if self.error:
            raise RuntimeError(self.error)
        return self.done

    def synchronize(self) -> None:
        self.cuda.log.append(("synchronize", self.name))
        self.done = True


def _maps():
    opened, closed = [], []
    maps = IpcMaps(lambda meta: (opened.append(meta), f"map:{meta}")[1], closed.append)
    return maps, opened, closed


def test_copies_wait_for_the_callers_stream_and_the_caller_waits_for_the_copies():
    cuda = FakeCuda()
    maps, _, _ = _maps()
    cs = CopyStream(cuda, "cuda:0", maps)
    done = cs.post(lambda: cuda.log.append(("copy", cuda.current.name)), [])
    # the pack queued on the caller's stream comes first: an event there, waited on by the copy stream
    assert cuda.log == [("record", "ev1", "caller"), ("wait", "copy", "ev1"), ("enter", "copy"),
                        ("copy", "copy"), ("record", "ev2", "copy"), ("exit", "copy")]
    del cuda.log[:]
    assert cs.check(done) == (False, None) and cuda.log == []  # not yet: the caller must not be told
    done.done = True
    assert cs.check(done) == (True, None)
    assert cuda.log == [("wait", "caller", "ev2")]  # the caller's later unpack is ordered after the copies


def test_nixl_vram_syncs_the_producers_stream_before_posting():
    cuda = FakeCuda()
    host_wait_for_stream(cuda, "cuda:0")
    assert cuda.log == [("record", "ev1", "caller"), ("synchronize", "ev1")]


def test_ipc_maps_open_once_per_peer_region_and_close_on_last_release():
    maps, opened, closed = _maps()
    assert (maps.opens, maps.closes) == (0, 0)  # a region no peer opens costs nothing here
    a, b = ("peer-a", "e1", 1), ("peer-b", "e1", 1)
    for _ in range(3):
        maps.release(a) if maps.acquire(a, "meta-a") else None
    maps.acquire(b, "meta-b")
    maps.release(b)
    assert opened == ["meta-a", "meta-b"] and closed == []  # two peers, two opens, nothing closed yet
    maps.retire(a)
    maps.retire(a)  # a second Unmap of the same region does not close twice
    assert closed == ["map:meta-a"]
    maps.retire_where(lambda k: k[0] == "peer-b")
    assert closed == ["map:meta-a", "map:meta-b"] and (maps.opens, maps.closes) == (2, 2) and len(maps) == 0


def test_peer_death_with_a_copy_in_flight_defers_the_close_until_the_copy_ends():
    cuda = FakeCuda()
    maps, opened, closed = _maps()
    cs = CopyStream(cuda, "cuda:0", maps)
    key = ("peer", "e1", 4)
    maps.acquire(key, "m")
    done = cs.post(lambda: None, [key])
    maps.retire_where(lambda k: k[0] == "peer")  # the peer died: its maps go, but not under the copy
    cs.reap()
    assert closed == [] and maps.refs(key) == 1
    done.done = True
    cs.reap()
    assert closed == ["map:m"] and cs.inflight() == 0
    # close of the endpoint: drain waits for what is in flight, then closes
    maps.acquire(("p2", "e", 1), "m2")
    ev = cs.post(lambda: None, [("p2", "e", 1)])
    maps.retire(("p2", "e", 1))
    cs.drain()
    assert ("synchronize", ev.name) in cuda.log and closed == ["map:m", "map:m2"]


def test_a_failed_copy_still_holds_its_maps_until_its_event_passes():
    cuda = FakeCuda()
    maps, _, closed = _maps()
    cs = CopyStream(cuda, "cuda:0", maps)
    maps.acquire(("p", "e", 1), "m")

    def copies():
        raise RuntimeError("CUDA error: invalid argument")
    with pytest.raises(RuntimeError):
        cs.post(copies, [("p", "e", 1)])
    maps.retire(("p", "e", 1))
    assert cs.inflight() == 1 and closed == []


def test_sticky_cuda_error_is_a_reason_not_an_exception():
    cuda = FakeCuda()
    maps, _, closed = _maps()
    cs = CopyStream(cuda, "cuda:0", maps)
    maps.acquire(("p", "e", 1), "m")
    done = cs.post(lambda: None, [("p", "e", 1)])
    done.error = "CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be reported..."
    finished, error = cs.check(done)
    assert finished and error == "CUDA error: an illegal memory access was encountered"
    cs.reap()
    maps.retire(("p", "e", 1))
    assert closed == ["map:m"]


def test_gpus_are_matched_by_uuid_not_index():
    # the owner sees only GPU bbb (CUDA_VISIBLE_DEVICES=1): its index 0 is index 1 here
    here = ["GPU-aaaa-1111", "GPU-bbbb-2222"]
    assert device_index_for_uuid("GPU-bbbb-2222", here) == 1
    assert device_index_for_uuid("bbbb-2222", here) == 1  # torch prints UUIDs without the GPU- prefix
    with pytest.raises(ValueError, match="GPU-cccc is not visible.*CUDA_VISIBLE_DEVICES"):
        device_index_for_uuid("GPU-cccc", here)
    props = {0: types.SimpleNamespace(uuid="aaaa-1111"), 1: types.SimpleNamespace(uuid="bbbb-2222")}
    cuda = types.SimpleNamespace(device_count=lambda: 2, get_device_properties=props.__getitem__)
    assert local_uuids(cuda) == ["aaaa-1111", "bbbb-2222"]


def test_torch_ipc_counter_policy_owner_keeps_one_count_importers_none():
    released, opened = [], []
    fake_torch = types.SimpleNamespace(
        UntypedStorage=types.SimpleNamespace(
            _release_ipc_counter_cuda=lambda h, off: released.append((h, off)),
            _new_shared_cuda=lambda *a: opened.append(a) or "storage"),
        uint8="u8",
        empty=lambda *a, **k: types.SimpleNamespace(set_=lambda s: [0] * 64))
    owner = types.SimpleNamespace(_torch=fake_torch, _shares={3: (b"/torch_rc_1", 5)})
    region = types.SimpleNamespace(region_id=3)
    NvlinkTransport._drop_region(owner, region)  # type: ignore[arg-type]
    NvlinkTransport._drop_region(owner, region)  # type: ignore[arg-type]
    assert released == [(b"/torch_rc_1", 5)]  # exactly the owner's one count, once
    importer = types.SimpleNamespace(_torch=fake_torch, _uuids=["GPU-x", "GPU-y"])
    meta = encode_ipc_handle((0, b"h" * 64, 4096, 0, b"/torch_rc_1", 5, b"e" * 64, False), 0, 64, "GPU-y")
    NvlinkTransport._open_region(importer, meta)  # type: ignore[arg-type]
    assert opened[0][0] == 1 and opened[0][4:6] == (NO_IPC_COUNTER, 0)  # GPU by UUID; no counter to decrement


class _Announcing(ShmTransport):
    announce_unmap = True
    gone: list

    def _peer_region_gone(self, conn, region_id: int) -> None:
        conn.extra.get("maps", {}).pop(region_id, None)  # shm's own map cache (nvlink: IpcMaps.retire)
        self.gone.append((conn.peer.name, region_id))


def test_deregister_tells_peers_which_drop_the_region():
    with _Announcing("owner", "h") as owner, create_transport("shm", "user", "h") as plain:
        user = _Announcing("user2", "h")
        user.gone = []
        try:
            info, _ = owner.alloc(4096)
            keep, _ = owner.alloc(4096)
            peer = user.connect(owner.address, timeout=10)
            plain.connect(owner.address, timeout=10)  # a peer that ignores Unmap is fine too
            local, _ = user.alloc(4096)
            with user.read(peer, [Desc(local.region_id, 0, info.region_id, 0, 16)], timeout=10) as h:
                h.result()
            owner.deregister(info.region_id)
            wait_until(lambda: user.gone, 10, "the user told of the deregistered region")
            assert user.gone == [("owner", info.region_id)]
            with pytest.raises(ValueError):  # the peer record no longer lists it: a clear error, no stale map
                user.read(peer, [Desc(local.region_id, 0, info.region_id, 0, 16)])
            with user.read(peer, [Desc(local.region_id, 0, keep.region_id, 0, 16)], timeout=10) as h:
                h.result()  # negative control: the region still registered still works
        finally:
            user.close()
