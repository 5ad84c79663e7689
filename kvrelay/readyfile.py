"""The ready-file convention of kvrelay processes (store daemon, engines, router).

A process that is serving writes a JSON object to ``--ready-file`` by renaming a finished temporary
file into place, so a reader never sees half a file; whoever started it waits for that file, with a
deadline, while checking the child is still alive.  Owns: both halves.  No dependencies, so light
processes can use it.  A parent spawns and waits through kvrelay.proc (`ChildProcess.wait_ready`, which also
names the child's log).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_ready_file(path: str | Path, info: dict) -> None:
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps(info))
    os.replace(tmp, path)

