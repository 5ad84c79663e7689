"""kvrelay.transfer.gpu_selfcheck on a machine without CUDA (forced here even on a GPU host): each check
answers ``{"ok": False, "skipped": "no CUDA device"}`` at once, without raising or starting anything."""

from __future__ import annotations

import subprocess
import time

import pytest
import torch

from kvrelay.transfer import gpu_selfcheck

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
