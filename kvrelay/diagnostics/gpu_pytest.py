"""The pytest part of the GPU check: a checkout's GPU-only test files, in a process of their own, with
TRITON_INTERPRET unset (real kernels).

Owns: finding those files under a tests directory the caller names (`python -m kvrelay.diagnostics.gpu_check
--tests DIR`; package code never guesses where a checkout is) and running pytest on them under a time
budget.  Must not touch: the tests themselves.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from kvrelay import proc


def gpu_test_files(tests_dir: str | Path) -> list[str]:
    """The GPU-only pytest files under ``tests_dir`` (``**/test_*_gpu.py`` and ``gpu/test_*.py``), as paths
    relative to its parent (the checkout's root), sorted."""
    tests = Path(tests_dir).resolve()
    root = tests.parent
    found = []
    for dirpath, _, files in os.walk(tests):
        for f in sorted(files):
            if f.startswith("test_") and f.endswith(".py") and (f.endswith("_gpu.py") or os.path.basename(dirpath) == "gpu"):
                found.append(os.path.relpath(os.path.join(dirpath, f), root))
    return sorted(found)


def gpu_pytest(tests_dir: str | Path | None, timeout: float = 170.0) -> dict:
    """Run the GPU-only test files of ``tests_dir`` (its parent as the working directory); ``{"ok", "files",
    "returncode", "summary", "tail"}``, skipped without a tests directory."""
    if tests_dir is None:
        return {"ok": False, "skipped": "no tests directory: run from a checkout or pass --tests DIR"}
    if not Path(tests_dir).is_dir():
        return {"ok": False, "error": f"--tests {tests_dir} is not a directory"}
    files = gpu_test_files(tests_dir)
    if not files:
        return {"ok": False, "error": f"no GPU-only test files (test_*_gpu.py, gpu/test_*.py) under {tests_dir}"}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory(prefix="kvrelay-gpu-pytest-") as tmp:
        child = proc.spawn([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *files],
                           name="pytest", cwd=Path(tests_dir).resolve().parent, env=env,
                           log=Path(tmp) / "pytest.log", session=True)
        code = child.wait(timeout)
        if code is None:
            child.kill()
            return {"ok": False, "files": files, "error": f"pytest ran past {timeout:.0f} s",
                    "tail": child.log_tail(15).splitlines()}
        lines = child.log_tail(200).strip().splitlines()
    return {"ok": code == 0, "files": files, "returncode": code, "summary": lines[-1:],
            "tail": lines[-15:] if code else []}
