"""Where a running `kvrelay up` says what it runs: its state file, and the registry `kvrelay status` reads.

Owns: the state file ``<workdir>/up.json`` (written whole by renaming, so a reader never sees half of
it) and one pointer file per running `kvrelay up` in the runtime directory (``$KVRELAY_RUNTIME_DIR``, or
``<tmp>/kvrelay-<uid>``), so `kvrelay status` finds the newest cluster without being told its work dir.
Must not touch: the processes themselves (supervisor.py) or how they are shown (status.py).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from kvrelay.readyfile import write_ready_file
from kvrelay.store.pool import owner_alive  # /proc: a zombie or a gone pid is not alive

STATE_FILE = "up.json"


def runtime_dir() -> Path:
    return Path(os.environ.get("KVRELAY_RUNTIME_DIR") or Path(tempfile.gettempdir()) / f"kvrelay-{os.getuid()}")


def _pointer(pid: int) -> Path:
    return runtime_dir() / f"up-{pid}.json"


def write_state(workdir: Path, state: dict[str, Any]) -> None:
    write_ready_file(workdir / STATE_FILE, state)


def register(workdir: Path, started: float) -> None:
    """Announce this `kvrelay up` (pid, work dir, start time) to `kvrelay status`."""
    d = runtime_dir()
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_ready_file(_pointer(os.getpid()), {"pid": os.getpid(), "workdir": str(workdir.resolve()),
                                             "started": started})


def unregister() -> None:
    _pointer(os.getpid()).unlink(missing_ok=True)


def newest_workdir() -> Path | None:
    """The work dir of the newest running `kvrelay up`; pointers of dead ones are removed on the way."""
    best: tuple[float, Path] | None = None
    for path in runtime_dir().glob("up-*.json"):
        try:
            info = json.loads(path.read_text())
            pid, workdir, started = int(info["pid"]), Path(info["workdir"]), float(info["started"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not owner_alive(pid):
            path.unlink(missing_ok=True)
            continue
        if best is None or started > best[0]:
            best = (started, workdir)
    return None if best is None else best[1]


def read_state(workdir: Path) -> dict[str, Any] | None:
    """The state of the `kvrelay up` running in ``workdir``; None if there is none (or it is gone)."""
    try:
        state = json.loads((workdir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not owner_alive(int(state.get("pid", 0))):
        return None
    return state
