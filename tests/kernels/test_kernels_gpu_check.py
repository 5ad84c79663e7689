"""The GPU check script: its exactness checks run here through Triton's interpreter on tiny caches,
and without CUDA the script exits 0 with a "no CUDA" message."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.mark.timeout(300)
def test_check_exact_on_cpu_interpreter():
    from kvrelay.kernels.gpu_check import check_exact
    assert check_exact(tokens=40, device="cpu") == []


@pytest.mark.timeout(120)
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script runs the real checks")
def test_no_cuda_message():
    r = subprocess.run([sys.executable, "-m", "kvrelay.kernels.gpu_check", "--quick"], capture_output=True,
                       text=True, timeout=100)
    assert r.returncode == 0, r.stderr
    assert "no CUDA" in r.stdout
