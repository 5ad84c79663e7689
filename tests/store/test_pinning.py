"""Pinning the store pool for GPU clients (issue 14, finding 9): a CPU-only client never calls into CUDA; a
GPU client pins lazily, in slices, in the background, with the portable flag, and clears the sticky error of
a failed register.  The CUDA runtime is a recording fake here (the real one runs in the GPU check,
kvrelay.diagnostics.gpu_selfcheck.check_store_gpu)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from store_helpers import COMPAT, make_chunk
from kvrelay.store.client import StoreClient
from kvrelay.store.pinning import CUDA_HOST_REGISTER_PORTABLE, PoolPinner

pytestmark = pytest.mark.timeout(120)
SLICE = 1 << 20


class FakeRuntime:
    """Records every runtime call in order; register fails from slice ``fail_at`` on (errors are sticky until
    get_last_error reads them, as in CUDA)."""

    def __init__(self, fail_at: int | None = None, gate: threading.Event | None = None) -> None:
        self.calls: list[tuple] = []
        self.fail_at, self.gate, self.sticky = fail_at, gate, 0

    def host_register(self, ptr: int, nbytes: int, flags: int) -> int:
        if self.gate is not None:
            self.gate.wait(10)
        n = sum(1 for c in self.calls if c[0] == "register")
        self.calls.append(("register", ptr, nbytes, flags))
        if self.fail_at is not None and n >= self.fail_at:
            self.sticky = 2  # cudaErrorMemoryAllocation
            return 2
        return 0

    def host_unregister(self, ptr: int) -> int:
        self.calls.append(("unregister", ptr))
        return 0

    def get_last_error(self) -> int:
        err, self.sticky = self.sticky, 0
        self.calls.append(("get_last_error", err))
        return err


def _forbid_cuda(monkeypatch) -> None:
    def boom(*a, **k):
        raise AssertionError("a CPU-only store client called into CUDA")
    for name in ("is_available", "cudart", "init", "current_device", "device_count", "synchronize",
                 "current_stream", "Event", "Stream"):
        monkeypatch.setattr(torch.cuda, name, boom)


def test_cpu_client_makes_no_cuda_call(daemon, monkeypatch):
    _forbid_cuda(monkeypatch)
    with StoreClient(daemon.address, compat_hash=COMPAT, name="cpu-only") as c:
        key, header, data = make_chunk(7101, 300_000)
        c.publish(key, header, data)
        out = torch.empty(300_000, dtype=torch.uint8)
        assert c.pull(key, out, time.monotonic() + 10) == header and torch.equal(out, data)
        assert not c._path.pinner.started and c._path.pinner.pinned_bytes == 0
    # negative control: the patch is live, so the old eager pin (is_available + cudaHostRegister) would have failed
    with pytest.raises(AssertionError, match="called into CUDA"):
        torch.cuda.is_available()


def test_gpu_use_pins_in_portable_slices_and_unpins_at_close():
    rt = FakeRuntime()
    p = PoolPinner(1 << 30, 5 * SLICE + 4096, slice_bytes=SLICE, runtime_factory=lambda: rt)
    assert rt.calls == [] and not p.started  # nothing before the first GPU use
    p.start()
    p.start()  # idempotent
    assert p.wait(10) and p.error is None and p.pinned_bytes == 5 * SLICE + 4096
    regs = [c for c in rt.calls if c[0] == "register"]
    assert [(c[1], c[2]) for c in regs] == [((1 << 30) + i * SLICE, SLICE) for i in range(5)] + [((1 << 30) + 5 * SLICE, 4096)]
    assert all(c[3] == CUDA_HOST_REGISTER_PORTABLE for c in regs)
    p.close()
    assert [c[1] for c in rt.calls if c[0] == "unregister"] == [c[1] for c in regs] and p.pinned_bytes == 0


def test_failed_register_clears_the_sticky_error_at_once_and_stays_pageable():
    rt = FakeRuntime(fail_at=2)
    p = PoolPinner(4096, 4 * SLICE, slice_bytes=SLICE, runtime_factory=lambda: rt)
    p.start()
    assert p.wait(10)
    assert p.pinned_bytes == 2 * SLICE and "cudaError 2" in p.error and "pageable" in p.error
    names = [c[0] for c in rt.calls]
    assert names == ["register", "register", "register", "get_last_error"]  # cleared right after the failure
    assert rt.sticky == 0 and rt.calls[-1] == ("get_last_error", 2)
    p.close()
    assert [c[1] for c in rt.calls if c[0] == "unregister"] == [4096, 4096 + SLICE]  # only what was pinned


def test_pinning_runs_in_the_background_with_progress():
    gate = threading.Event()
    rt = FakeRuntime(gate=gate)
    p = PoolPinner(0, 3 * SLICE, slice_bytes=SLICE, runtime_factory=lambda: rt)
    t0 = time.monotonic()
    p.start()
    assert time.monotonic() - t0 < 1 and p.pinned_bytes == 0 and not p.wait(0.05)  # start() did not block
    gate.set()
    assert p.wait(10) and p.pinned_bytes == 3 * SLICE
    p.close()


def test_close_stops_a_pinning_in_progress():
    gate = threading.Event()
    rt = FakeRuntime(gate=gate)
    p = PoolPinner(0, 50 * SLICE, slice_bytes=SLICE, runtime_factory=lambda: rt)
    p.start()
    threading.Timer(0.05, gate.set).start()
    p.close()
    regs = [c for c in rt.calls if c[0] == "register"]
    assert len(regs) < 50 and len([c for c in rt.calls if c[0] == "unregister"]) == len(regs) and p.pinned_bytes == 0
