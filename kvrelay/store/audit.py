"""The store's audit log: one JSON line appended per purge (who asked, what went), never rewritten.

Owns: the file's format and its appends (``O_APPEND``, mode 0600, flushed to disk before the purge is
answered).  Must not touch: what a purge does (purge.py).

A line: ``{"time": ISO-8601 UTC, "event": "purge", "by": the name the operator gave (--by), "client": the
control-plane peer's hello name, "peer": what the kernel says of it (purge.py `peer_identity`: uid, user
and pid of a same-host client),
"tenant", "prefix", "namespace", "chunks", "bytes", "skipped"}``.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
from typing import Any


class AuditLog:
    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ValueError(f"audit_log {path}: cannot open it for appending ({exc.strerror})") from None
        self._lock = threading.Lock()

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        line = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
                "event": event, **fields}
        data = (json.dumps(line, sort_keys=False) + "\n").encode()
        with self._lock:
            os.write(self._fd, data)
            os.fsync(self._fd)
        return line

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
