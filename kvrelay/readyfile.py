"""The ready-file convention of kvrelay processes (store daemon, engines, router).

A process that is serving writes a JSON object to ``--ready-file`` by renaming a finished temporary
file into place, so a reader never sees half a file; whoever started it waits for that file, with a
deadline, while checking the child is still alive.  Owns: both halves.  No dependencies, so light
processes can use it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path


def write_ready_file(path: str | Path, info: dict) -> None:
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps(info))
    os.replace(tmp, path)


def wait_ready_file(path: Path, proc: subprocess.Popen, timeout: float) -> dict:
    """Wait until ``proc`` has written ``path``; return its JSON.

    Raises ChildProcessError if the child exits first and TimeoutError past ``timeout`` seconds (the
    child is left running: the caller decides whether to kill it)."""
    deadline = time.monotonic() + timeout
    while not path.exists():  # a child in another process: no event to wait on but the file itself
        if proc.poll() is not None:
            raise ChildProcessError(f"exited with code {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise TimeoutError(f"not ready within {timeout:.0f}s")
        time.sleep(0.02)
    return json.loads(path.read_text())
