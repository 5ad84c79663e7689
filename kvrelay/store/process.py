"""Start a `kvrelay store` daemon as a child process and wait until it serves (bench, launcher, tests).

Owns: spawning and stopping one daemon process.  Must not touch: the daemon's internals.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from kvrelay.readyfile import wait_ready_file
from kvrelay.store.pool import unlink_pool


def die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent (thread that started it) dies, so no daemon
    outlives its starter."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class DaemonProcess:
    """``kvrelay store`` with ``options`` (flag names without dashes, e.g. pool_size="1GiB")."""

    def __init__(self, **options) -> None:
        self.options = options
        self.pool_name = options.pop("pool_name", f"kvrelay-{uuid.uuid4().hex[:12]}")
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}
        self.spawn_to_ready_s = 0.0

    def start(self, timeout: float = 120.0, log_path: str | None = None) -> "DaemonProcess":
        ready = Path(tempfile.gettempdir()) / f"kvrelay-ready-{uuid.uuid4().hex[:8]}.json"
        args = [sys.executable, "-m", "kvrelay.cli", "store", "--pool-name", self.pool_name,
                "--ready-file", str(ready), "--log-level", "WARNING"]
        opts = {"port": 0, "metrics_port": 0, **self.options}
        for k, v in opts.items():
            args += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL
        t0 = time.monotonic()
        self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT if log_path else subprocess.DEVNULL,
                                     preexec_fn=die_with_parent)
        try:
            try:
                self.info = wait_ready_file(ready, self.proc, timeout)
            except ChildProcessError as exc:
                raise RuntimeError(f"kvrelay store {exc} (args {args})") from None
            except TimeoutError:
                raise TimeoutError(f"kvrelay store did not become ready within {timeout}s") from None
            self.spawn_to_ready_s = time.monotonic() - t0
            ready.unlink()
        except BaseException:
            self.stop(signal.SIGKILL)
            raise
        return self

    @property
    def address(self) -> str:
        return self.info["address"]

    @property
    def pid(self) -> int:
        return self.info["pid"]

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None
        unlink_pool(self.pool_name)

    def __enter__(self) -> "DaemonProcess":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
