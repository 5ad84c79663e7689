"""The device path's stream contract, device guard and no-readback rule, driven on CPU by a recording
fake of the CUDA runtime (kvrelay/kernels/cuda_path.py).  The kernel itself really runs (Triton's
interpreter on CPU tensors), so every ordering test also checks the bytes against the reference."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from kernels_util import allocate
from kvrelay.kernels import KVLayout, pack, reference
from kvrelay.kernels import cuda_path
from kvrelay.kernels.plan import plan_pack, plan_unpack

DEV = torch.device("cuda", 1)  # the cache's device, as the fake reports it; the current device is cuda:0


class FakeStream:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


class FakeEvent:
    def __init__(self, log: list, n: int) -> None:
        self.log, self.n = log, n

    def record(self, stream: FakeStream) -> None:
        self.log.append(("record", self.n, stream))

    def synchronize(self) -> None:
        self.log.append(("sync", self.n))


class FakeRuntime(cuda_path.CudaRuntime):
    """Logs every CUDA call with the device guard and stream in force at that moment."""

    def __init__(self, host: tuple[torch.Tensor, ...] = ()) -> None:
        self.log: list[tuple] = []
        self.device = torch.device("cuda", 0)
        self.streams = {0: FakeStream("current0"), 1: FakeStream("current1")}
        self.stream: FakeStream | None = None
        self.host = {id(t) for t in host}
        self.events = 0

    def where(self) -> tuple:
        return (self.device, self.stream)

    def device_of(self, t):
        return DEV

    def is_host(self, t):
        return id(t) in self.host

    @contextmanager
    def device_guard(self, device):
        before = self.device
        self.device = device
        self.log.append(("guard", device))
        try:
            yield
        finally:
            self.device = before
            self.log.append(("unguard", device))

    def current_stream(self, device):
        return self.streams[device.index]

    @contextmanager
    def stream_guard(self, stream):
        before, self.stream = self.stream, stream
        try:
            yield
        finally:
            self.stream = before

    def event(self):
        self.events += 1
        return FakeEvent(self.log, self.events)

    def wait_event(self, stream, event):
        self.log.append(("wait", stream, event.n))

    def record_stream(self, t, stream):
        self.log.append(("record_stream", t.data_ptr(), stream))

    def empty(self, nbytes, device):
        self.log.append(("empty", *self.where()))
        return torch.empty(nbytes, dtype=torch.uint8)

    def upload(self, ids, device):
        self.log.append(("upload", *self.where()))
        return torch.from_numpy(ids.copy())

    def copy_async(self, dst, src):
        self.log.append(("copy", *self.where()))
        dst.copy_(src)

    def launch(self, view, plan, chunk, ids, pack):
        self.log.append(("launch", "pack" if pack else "unpack", *self.where()))
        super().launch(view, plan, chunk, ids, pack)

    def kinds(self) -> list[str]:
        return [e[0] for e in self.log]


@pytest.fixture(autouse=True)
def _fresh_ids_cache():
    cuda_path.IDS.clear()
    yield
    cuda_path.IDS.clear()


def _setup(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lay = KVLayout(num_layers=1, num_blocks=6, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16)
    layer = allocate(lay, gen)
    plan = plan_pack(lay, [5, 1, 3, 0], 1, 14, None, None)
    want = torch.zeros(plan.nbytes, dtype=torch.uint8)
    reference.pack(lay, layer, plan, want)
    return lay, layer, plan, want


def _copy(rt, lay, layer, plan, buf, pack_=True, stream=None, done=None):
    return cuda_path.copy(cuda_path.layer_view(lay, layer), plan, buf, pack_, stream, done, rt)


@pytest.mark.timeout(120)
def test_default_stream_is_the_caches_device_current_stream_inside_a_guard():
    lay, layer, plan, want = _setup()
    out = torch.zeros(plan.nbytes, dtype=torch.uint8)
    rt = FakeRuntime()
    assert _copy(rt, lay, layer, plan, out) == plan.nbytes
    assert torch.equal(out, want)
    assert rt.log[0] == ("guard", DEV) and rt.log[-1] == ("unguard", DEV)
    cur = rt.streams[1]  # cuda:1's current stream, not the current device's
    assert ("upload", DEV, cur) in rt.log and ("launch", "pack", DEV, cur) in rt.log
    assert "sync" not in rt.kinds() and "record_stream" not in rt.kinds()  # asynchronous, same stream


@pytest.mark.timeout(120)
def test_explicit_stream_records_callers_tensors_and_done_after_the_kernel():
    lay, layer, plan, want = _setup()
    out = torch.zeros(plan.nbytes, dtype=torch.uint8)
    rt = FakeRuntime()
    side, done = FakeStream("side"), FakeEvent(rt.log, 99)
    _copy(rt, lay, layer, plan, out, stream=side, done=done)
    assert torch.equal(out, want)
    assert ("launch", "pack", DEV, side) in rt.log
    recorded = {e[1] for e in rt.log if e[0] == "record_stream" and e[2] is side}
    assert recorded == {layer.data_ptr(), out.data_ptr()}  # the allocator keeps both alive for `side`
    k = rt.kinds()
    assert k.index("record_stream") < k.index("launch") < rt.log.index(("record", 99, side))
    assert "sync" not in k


@pytest.mark.timeout(120)
def test_pack_into_host_memory_waits_on_an_event_of_its_stream_only_after_the_copy():
    lay, layer, plan, want = _setup()
    out = torch.zeros(plan.nbytes + 5, dtype=torch.uint8)
    rt = FakeRuntime(host=(out,))
    _copy(rt, lay, layer, plan, out)
    assert torch.equal(out[:plan.nbytes], want) and not out[plan.nbytes:].any()
    cur = rt.streams[1]
    assert [e for e in rt.log if e[0] in ("empty", "launch", "copy", "record", "sync", "unguard")] == [
        ("record", 1, cur),  # the ids' upload
        ("empty", DEV, cur), ("launch", "pack", DEV, cur), ("copy", DEV, cur), ("record", 2, cur),
        ("unguard", DEV), ("sync", 2)]


@pytest.mark.timeout(120)
def test_host_buffer_with_done_returns_without_waiting():
    lay, layer, plan, want = _setup()
    out = torch.zeros(plan.nbytes, dtype=torch.uint8)
    rt = FakeRuntime(host=(out,))
    done = FakeEvent(rt.log, 99)
    _copy(rt, lay, layer, plan, out, done=done)
    assert "sync" not in rt.kinds()
    assert rt.kinds().index("copy") < rt.log.index(("record", 99, rt.streams[1]))


@pytest.mark.timeout(120)
def test_unpack_from_host_memory_frees_the_chunk_once_it_is_on_the_device():
    lay, layer, _, want = _setup()
    plan = plan_unpack(lay, [2, 4, 0, 1], 1, 14, 0, 2)
    got = allocate(lay, torch.Generator().manual_seed(1))
    expect = got.clone()
    reference.unpack(lay, expect, plan, want)
    chunk = want.clone()
    rt = FakeRuntime(host=(chunk,))
    _copy(rt, lay, got, plan, chunk, pack_=False)
    assert torch.equal(got.view(torch.uint8), expect.view(torch.uint8))
    cur = rt.streams[1]
    assert [e for e in rt.log if e[0] in ("empty", "copy", "record", "launch", "sync")] == [
        ("record", 1, cur), ("empty", DEV, cur), ("copy", DEV, cur), ("record", 2, cur), ("launch", "unpack", DEV, cur), ("sync", 2)]


@pytest.mark.timeout(120)
def test_block_ids_upload_once_and_other_streams_wait_for_it():
    lay, layer, plan, _ = _setup()
    out = torch.zeros(plan.nbytes, dtype=torch.uint8)
    rt = FakeRuntime()
    _copy(rt, lay, layer, plan, out)
    _copy(rt, lay, layer, plan, out)
    assert rt.kinds().count("upload") == 1 and cuda_path.IDS.uploads == 1
    side = FakeStream("side")
    rt.log.clear()
    _copy(rt, lay, layer, plan, out, stream=side)
    assert "upload" not in rt.kinds()
    assert ("wait", side, 1) in rt.log  # ordered after the upload on the other stream
    plan2 = plan_pack(lay, [5, 1, 3, 2], 1, 14, None, None)  # another request: another upload
    _copy(rt, lay, layer, plan2, out)
    assert cuda_path.IDS.uploads == 2


_READBACK = {"item", "cpu", "tolist", "numpy", "__int__", "__float__", "__bool__", "__index__"}


class _CountReadbacks(TorchFunctionMode):
    """Counts tensor calls that read data back to the host (on a CUDA tensor each is a device sync)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        to_cpu = name == "to" and any(str(a) == "cpu" for a in (*args[1:], *(kwargs or {}).values()))
        if not self.paused and (name in _READBACK or to_cpu):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


class _QuietRuntime(FakeRuntime):
    """The kernel launch is not counted: on CPU the interpreter reads its tensors, on a GPU it does not."""

    mode: _CountReadbacks | None = None

    def launch(self, view, plan, chunk, ids, pack):
        assert self.mode is not None
        self.mode.paused = True
        try:
            super().launch(view, plan, chunk, ids, pack)
        finally:
            self.mode.paused = False


@pytest.mark.timeout(120)
def test_no_device_readback_per_call():
    lay, layer, _, want = _setup()
    out = torch.zeros(want.numel(), dtype=torch.uint8)
    rt = _QuietRuntime()
    ids = [5, 1, 3, 0]
    with _CountReadbacks() as mode:
        rt.mode = mode
        for _ in range(3):
            plan = plan_pack(lay, ids, 1, 14, None, None)
            _copy(rt, lay, layer, plan, out)
    assert mode.calls == []
    assert torch.equal(out, want)
    with _CountReadbacks() as control:  # negative control: ids handed over as a tensor are read back
        plan_pack(lay, torch.tensor(ids), 1, 14, None, None)
    assert control.calls


def test_stream_arguments_are_refused_for_cpu_caches():
    lay, layer, plan, _ = _setup()
    out = torch.zeros(plan.nbytes, dtype=torch.uint8)
    with pytest.raises(ValueError, match="stream= and done= apply to CUDA caches"):
        pack(lay, layer, [5, 1, 3, 0], 1, 14, out, stream=object())
    assert not out.any()


def test_layer_view_validates_once_per_geometry_and_matches_the_layout():
    lay, layer, _, _ = _setup()
    v = cuda_path.layer_view(lay, layer)
    w = lay.layer_view(layer)
    assert (v.offsets, v.block_stride, v.token_stride, v.head_stride, v.row_bytes) == \
        (w.offsets, w.block_stride, w.token_stride, w.head_stride, w.row_bytes)
    assert [t.data_ptr() for t in v.tensors] == [t.data_ptr() for t in w.tensors]
    with pytest.raises(ValueError, match="shape mismatch"):
        cuda_path.layer_view(lay, torch.zeros(2, 6, 4, 2, 9, dtype=torch.bfloat16))
    assert np.array_equal(np.asarray(v.offsets), np.asarray(w.offsets))
