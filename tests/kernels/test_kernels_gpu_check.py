"""The GPU check without a GPU: its exactness part runs here through Triton's interpreter on small caches,
its runner's budgets and failure isolation run on stand-in child commands, and the script itself prints
the "no CUDA" JSON (every part listed) and exits 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvrelay.diagnostics import gpu_check, gpu_pytest
from kvrelay.kernels import gpu_parts

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script runs the real checks")


@pytest.mark.timeout(300)
def test_exact_part_on_the_cpu_interpreter_covers_every_word_width():
    result = gpu_parts.exact(device="cpu", tokens=40)
    assert result == {"ok": True, "cases": len(gpu_parts.CASES), "failures": [], "word_widths": [1, 2, 4, 8]}


@pytest.mark.timeout(120)
def test_exact_part_fails_when_a_kernel_writes_wrong_bytes(monkeypatch):
    """Negative control: a kernel that misses one byte is reported, case by case."""
    from kvrelay.kernels import triton_kernels
    real = triton_kernels.copy

    def off_by_one(view, plan, chunk, ids, pack, block_t=None):
        n = real(view, plan, chunk, ids, pack, block_t)
        if pack:
            flat = chunk.reshape(-1).view(torch.uint8)
            flat[n - 1] ^= 1
        return n
    monkeypatch.setattr(triton_kernels, "copy", off_by_one)
    result = gpu_parts.exact(device="cpu", tokens=20)
    assert not result["ok"] and len(result["failures"]) >= len(gpu_parts.CASES)


def test_every_part_has_a_budget_and_a_function_and_fits_ten_minutes():
    assert tuple(gpu_check.PARTS) == gpu_check.PART_NAMES
    assert tuple(gpu_parts.PARTS) == gpu_check.PART_NAMES[:len(gpu_parts.PARTS)]  # the kernel parts come first
    assert sum(gpu_check.BUDGETS.values()) <= gpu_check.DEADLINE_S <= 600


@pytest.mark.timeout(60)
def test_runner_isolates_a_crash_a_hang_and_a_missing_result():
    scripts = {
        "exact": f"print({gpu_check.MARK!r} + '{{\"ok\": true, \"n\": 3}}')",
        "large": "import sys; sys.exit('boom: a CUDA error')",
        "streams": "import time; time.sleep(30)",
        "staging": "print('no marker line')",
        "bandwidth": f"print({gpu_check.MARK!r} + '{{\"ok\": false, \"skipped\": \"nixl missing\"}}')",
    }
    names = tuple(scripts)
    budgets = {n: 3.0 for n in names}
    results = gpu_check.run_parts(names, lambda n: [sys.executable, "-c", scripts[n]], budgets, deadline_s=60)
    assert results["exact"]["ok"] is True and results["exact"]["n"] == 3
    assert results["large"]["ok"] is False and "boom" in " ".join(results["large"]["tail"])
    assert results["streams"] == {"ok": False, "error": "ran past its budget of 3 s", "seconds": pytest.approx(3, abs=2)}
    assert results["staging"]["ok"] is False and "without a result" in results["staging"]["error"]
    assert results["bandwidth"]["skipped"] == "nixl missing"


@pytest.mark.timeout(60)
def test_runner_stops_starting_parts_at_the_deadline():
    results = gpu_check.run_parts(("exact", "large"), lambda n: [sys.executable, "-c", "import time; time.sleep(2)"],
                                  {"exact": 10.0, "large": 10.0}, deadline_s=6)
    assert "deadline" in results["large"]["error"]


def test_a_part_that_returns_no_result_dict_is_reported(monkeypatch):
    monkeypatch.setitem(gpu_check.PARTS, "nvlink", lambda: None)
    result = gpu_check.run_part_here("nvlink", quick=True)
    assert result["ok"] is False and "not a dict with 'ok'" in result["error"]


def test_gpu_test_files_are_found_under_the_tests_directory_given():
    tests = Path(__file__).resolve().parents[1]
    files = gpu_pytest.gpu_test_files(tests)
    assert "tests/gpu/test_kernels_gpu.py" in files
    assert all(f.endswith("_gpu.py") or f.startswith("tests/gpu/") for f in files)


def test_the_pytest_part_needs_a_tests_directory(tmp_path):
    assert "skipped" in gpu_pytest.gpu_pytest(None)  # not run from a checkout, no --tests: listed, not failed
    assert "not a directory" in gpu_pytest.gpu_pytest(tmp_path / "nowhere")["error"]
    assert "no GPU-only test files" in gpu_pytest.gpu_pytest(tmp_path)["error"]


def test_the_parts_get_the_tests_directory_on_their_command_line(tmp_path):
    cmd = gpu_check.part_command("pytest_gpu", quick=True, tests_dir=str(tmp_path))
    assert cmd[-2:] == ["--tests", str(tmp_path.resolve())] and "kvrelay.diagnostics.gpu_check" in cmd


@pytest.mark.timeout(120)
@NO_CUDA
def test_no_cuda_json_lists_every_part_and_exits_0():
    r = subprocess.run([sys.executable, "-m", "kvrelay.diagnostics.gpu_check", "--quick"], capture_output=True,
                       text=True, timeout=100)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["cuda"] is False and out["ok"] is True and "no CUDA device" in out["reason"]
    assert list(out["parts"]) == list(gpu_check.PART_NAMES)
    assert all(p == {"ok": None, "skipped": "no CUDA device"} for p in out["parts"].values())
