"""`shm`'s shared-memory segments: their names, creating and mapping them, and sweeping dead processes' ones.

Owns: segment names ``kvrelay-xfer-<pid>-<epoch>-<region>`` in /dev/shm, `segments()` (a leak counter for
tests), `sweep_stale()` (unlink segments whose creating process is dead) and mapping a segment (`map_segment`).
Must not touch: regions' bookkeeping (the endpoint), copies (shm_copy.py).
"""

from __future__ import annotations

import mmap
import os

from kvrelay.proc import pid_alive

SHM_DIR = "/dev/shm"
PREFIX = "kvrelay-xfer-"


def segments() -> list[str]:
    """Names of kvrelay shared-memory segments that exist now (a leak counter for tests)."""
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(PREFIX))
    except FileNotFoundError:
        return []


def sweep_stale() -> list[str]:
    """Unlink segments whose creating process no longer exists; return their names."""
    removed = []
    for name in segments():
        try:
            pid = int(name[len(PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if not pid_alive(pid):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed


def map_segment(name: str, nbytes: int, create: bool) -> mmap.mmap:
    path = os.path.join(SHM_DIR, name)
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if create:
            os.ftruncate(fd, nbytes)
        elif os.fstat(fd).st_size < nbytes:
            raise ValueError(f"shared-memory segment {name} is {os.fstat(fd).st_size} bytes, "
                             f"the peer announced {nbytes}")
        return mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    finally:
        os.close(fd)


def unlink_segment(name: str) -> None:
    """Remove a segment's name (its memory goes when the last mapping does); gone already is fine."""
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass
