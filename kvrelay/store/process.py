"""Start a `kvrelay store` daemon as a child process and wait until it serves (bench, launcher, tests).

Owns: spawning and stopping one daemon process.  Must not touch: the daemon's internals.
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from kvrelay import proc
from kvrelay.store.pool import unlink_pool


class DaemonProcess:
    """``kvrelay store`` with ``options`` (flag names without dashes, e.g. pool_size="1GiB")."""

    def __init__(self, **options) -> None:
        self.options = options
        self.pool_name = options.pop("pool_name", f"kvrelay-{uuid.uuid4().hex[:12]}")
        self.child: proc.ChildProcess | None = None
        self.info: dict = {}
        self.spawn_to_ready_s = 0.0

    @property
    def proc(self) -> "subprocess.Popen[bytes] | None":
        return self.child.popen if self.child is not None else None

    def start(self, timeout: float = 120.0, log_path: str | None = None) -> "DaemonProcess":
        ready = Path(tempfile.gettempdir()) / f"kvrelay-ready-{uuid.uuid4().hex[:8]}.json"
        args = ["store", "--pool-name", self.pool_name, "--log-level", "WARNING"]
        opts = {"port": 0, "metrics_port": 0, **self.options}
        for k, v in opts.items():
            args += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
        t0 = time.monotonic()
        self.child = proc.spawn_kvrelay(args, name="kvrelay store", ready_file=ready,
                                        log=log_path if log_path else proc.DISCARD, log_mode="ab",
                                        die_with_parent=True)
        try:
            try:
                self.info = self.child.wait_ready(timeout)
            except proc.ChildExited as exc:
                raise RuntimeError(f"kvrelay store exited with code {exc.code} before it was ready "
                                   f"(args {self.child.argv})") from None
            except proc.ChildTimeout:
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
        return proc.rss_bytes(self.pid)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.child is not None:
            self.child.stop(timeout, sig=sig)
        self.child = None
        unlink_pool(self.pool_name)

    def __enter__(self) -> "DaemonProcess":
        return self.start() if self.child is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
