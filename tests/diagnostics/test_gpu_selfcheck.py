"""kvrelay.diagnostics.gpu_selfcheck on a machine without CUDA (forced here even on a GPU host): each check
answers ``{"ok": False, "skipped": "no CUDA device"}`` at once, without raising or starting anything."""

from __future__ import annotations

import subprocess
import time

import pytest
import torch

from kvrelay.diagnostics import gpu_selfcheck

pytestmark = pytest.mark.timeout(60)


def test_each_check_skips_at_once_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a) or pytest.fail("started a process"))
    for check in (gpu_selfcheck.check_nvlink, gpu_selfcheck.check_nixl_vram, gpu_selfcheck.check_store_gpu):
        t0 = time.monotonic()
        assert check() == {"ok": False, "skipped": "no CUDA device"}
        assert time.monotonic() - t0 < 1
    assert started == []


def test_a_failing_check_reports_instead_of_raising(monkeypatch):
    # negative control: with CUDA claimed, a check whose body fails returns ok=False and the error
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def broken() -> dict:
        raise RuntimeError("CUDA error: out of memory")
    out = gpu_selfcheck._guarded(broken)
    assert out["ok"] is False and out["error"] == "RuntimeError: CUDA error: out of memory" and "seconds" in out


def test_dry_run_of_the_checks_code_on_cpu():
    """The code the GPU check runs, on CPU tensors over host transports (a GPU minute is not spent on a typo):
    a peer process and a store daemon, byte-exact both ways, handles released, figures reported."""
    out = gpu_selfcheck._round_trip("tcp", nbytes=1 << 20, bw_bytes=2 << 20, reps=1, device="cpu")
    assert out["ok"] and out["write_read_exact"] and out["open_handles"] == 0 and out["read_GBps"] > 0
    store = gpu_selfcheck._store_check(2, 1 << 20, "cpu")
    assert store["ok"] and store["shm"]["exact"] and store["tcp"]["exact"], store
