"""The ten-minute GPU check: `python -m kvrelay.diagnostics.gpu_check [--quick] [--tests DIR]`, one JSON
summary on stdout.

Owns: the list of parts and their budgets, running each part in a process of its own (through kvrelay.proc,
in its own process group) (a CUDA error or a hang in one part
cannot spoil the next) under the part's time budget and an overall deadline, and the summary: the
device, each part's ``{"ok", "seconds", ...figures}`` (``"error"`` when it crashed or ran out of time,
``"skipped"`` when it could not run here, e.g. NIXL without CUDA support), and the failed and skipped
lists.  Progress goes to stderr.  Exit status 1 if any part failed (a skipped part is listed, not
failed); 0 with ``{"cuda": false, ...}`` on a machine without a CUDA device.  Must not touch: anything
but the processes it starts.

Parts: exact (byte-exact vs the torch reference with guard bytes: every word width, TP and block-size
conversion, MLA, > 1,024 words per token), large (layers over 2**31 elements and bytes), streams (side
stream + done event, the cache device's current stream, a non-current device, no host wait per call, no
recompiles across token ranges), staging (CUDA cache <-> pinned and pageable host memory), bandwidth (vs
the device's peak, pass/fail) from kvrelay/kernels/gpu_parts.py; nvlink / nixl_vram / store_gpu
(gpu_selfcheck.py); and pytest_gpu (gpu_pytest.py: the GPU-only test files of the checkout whose tests
directory ``--tests`` names, default ``./tests``, TRITON_INTERPRET unset).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from kvrelay import proc
from kvrelay.diagnostics import gpu_pytest, gpu_selfcheck
from kvrelay.kernels import gpu_parts

MARK = "GPU_CHECK_PART "
DEADLINE_S = 580.0  # all parts together, under the ten minutes a GPU session grants
BUDGETS = {"exact": 120.0, "large": 45.0, "streams": 45.0, "staging": 30.0, "bandwidth": 60.0, "nvlink": 50.0,
           "nixl_vram": 50.0, "store_gpu": 50.0, "pytest_gpu": 100.0}  # seconds, start-up included
PART_NAMES = tuple(BUDGETS)
PARTS: dict[str, Callable[..., dict]] = {  # in the order of BUDGETS
    **gpu_parts.PARTS, "nvlink": gpu_selfcheck.check_nvlink, "nixl_vram": gpu_selfcheck.check_nixl_vram,
    "store_gpu": gpu_selfcheck.check_store_gpu, "pytest_gpu": gpu_pytest.gpu_pytest,
}


def default_tests_dir() -> str | None:
    """``./tests`` when the check runs from a checkout's root, else None (the pytest part is skipped)."""
    return "tests" if Path("tests").is_dir() else None


def part_command(name: str, quick: bool, tests_dir: str | None = None) -> list[str]:
    return [sys.executable, "-m", "kvrelay.diagnostics.gpu_check", "--part", name, *(["--quick"] if quick else []),
            *(["--tests", str(Path(tests_dir).resolve())] if tests_dir else [])]


def run_part_here(name: str, quick: bool, tests_dir: str | None = None) -> dict:
    """One part in this process (what a child runs); exceptions become the part's error."""
    t0 = time.monotonic()
    try:
        if name == "bandwidth":
            result = gpu_parts.bandwidth(quick=quick)
        elif name == "pytest_gpu":
            result = gpu_pytest.gpu_pytest(tests_dir, timeout=BUDGETS[name] - 10)
        else:
            result = PARTS[name]()
        if not isinstance(result, dict) or "ok" not in result:
            result = {"ok": False, "error": f"part {name} returned {result!r:.200}, not a dict with 'ok'"}
    except Exception as exc:  # noqa: BLE001 - a part reports, it never takes the check down
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    result.setdefault("seconds", round(time.monotonic() - t0, 2))
    return result


def run_parts(names: tuple[str, ...], command: Callable[[str], list[str]], budgets: dict[str, float],
              deadline_s: float, log: Callable[[str], None] = lambda s: None) -> dict[str, dict]:
    """Each part in a child process under min(its budget, what is left of the deadline)."""
    end = time.monotonic() + deadline_s
    results: dict[str, dict] = {}
    for name in names:
        left = end - time.monotonic()
        if left < 5:
            results[name] = {"ok": False, "error": f"not run: the check's {deadline_s:.0f} s deadline was reached"}
            log(f"{name}: not run (deadline)")
            continue
        budget = min(budgets[name], left)
        t0 = time.monotonic()
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        with tempfile.TemporaryDirectory(prefix="kvrelay-gpu-check-") as tmp:
            child = proc.spawn(command(name), name=name, env=env, log=Path(tmp) / f"{name}.log", session=True)
            code = child.wait(budget)
            if code is None:
                child.kill()  # its process group: a peer it started goes too
                results[name] = {"ok": False, "error": f"ran past its budget of {budget:.0f} s"}
            else:
                text = child.log_tail(10_000)
                lines = [ln for ln in text.splitlines() if ln.startswith(MARK)]
                if lines:
                    results[name] = json.loads(lines[-1][len(MARK):])
                else:
                    results[name] = {"ok": False, "error": f"the part exited {code} without a result",
                                     "tail": text.strip().splitlines()[-8:]}
        results[name].setdefault("seconds", round(time.monotonic() - t0, 2))
        status = "skipped" if _skipped(results[name]) else ("ok" if results[name]["ok"] else "FAIL")
        log(f"{name}: {status} ({results[name]['seconds']} s)")
    return results


def _skipped(r: dict) -> bool:
    return not r.get("ok") and "skipped" in r


def summary(parts: dict[str, dict], seconds: float) -> dict:
    failed = [n for n, r in parts.items() if not r.get("ok") and not _skipped(r)]
    return {"check": "kvrelay.diagnostics.gpu_check", "cuda": True, "device": torch.cuda.get_device_name(),
            "devices": torch.cuda.device_count(), "torch": torch.__version__, "triton": _triton_version(),
            "host": platform.node(), "ok": not failed, "failed": failed,
            "skipped": [n for n, r in parts.items() if _skipped(r)], "seconds": round(seconds, 1), "parts": parts}


def no_cuda_summary() -> dict:
    return {"check": "kvrelay.diagnostics.gpu_check", "cuda": False, "ok": True,
            "reason": "no CUDA device: nothing to check here (the Triton kernels are tested on CPU through "
                      "Triton's interpreter: tests/kernels)",
            "failed": [], "skipped": list(PART_NAMES),
            "parts": {n: {"ok": None, "skipped": "no CUDA device"} for n in PART_NAMES}}


def _triton_version() -> str:
    try:
        import triton
        return str(triton.__version__)
    except ImportError:
        return "missing"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvrelay.diagnostics.gpu_check",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats in the bandwidth part")
    parser.add_argument("--tests", metavar="DIR", default=None,
                        help="the checkout's tests directory, whose GPU-only files the pytest_gpu part runs "
                             "(default: ./tests if it exists; without one that part is skipped)")
    parser.add_argument("--part", choices=PART_NAMES, help="run one part in this process (what the check's children do)")
    args = parser.parse_args(argv)
    tests_dir = args.tests if args.tests is not None else default_tests_dir()
    if not torch.cuda.is_available():
        print(json.dumps(no_cuda_summary(), indent=1))
        return 0
    if args.part:
        print(MARK + json.dumps(run_part_here(args.part, args.quick, tests_dir)), flush=True)
        return 0
    t0 = time.monotonic()
    parts = run_parts(PART_NAMES, lambda n: part_command(n, args.quick, tests_dir), BUDGETS, DEADLINE_S,
                      lambda s: print(s, file=sys.stderr, flush=True))
    result = summary(parts, time.monotonic() - t0)
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
