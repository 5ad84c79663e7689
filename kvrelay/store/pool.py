"""The host-memory pool: ONE preallocated POSIX shared-memory segment plus an arena allocator over it.

Owns: creating/attaching the segment (/dev/shm/<name>), prefaulting it, and handing out aligned byte
ranges.  Must not touch: what is stored in a range (index.py) or the SSD tier.

The daemon creates the segment; same-host clients attach it read-write and pack straight into their
reserved slot or copy out of it.  The allocator works in ``ALIGN``-byte units (4 KiB, so a slot can be
written to SSD with O_DIRECT straight from the pool) over a sorted free list with coalescing: no memory
is allocated per chunk, only ranges of the segment are handed out.
"""

from __future__ import annotations

import bisect
import mmap
import os
import re

ALIGN = 4096
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def shm_path(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(f"pool name {name!r} is not a valid shared-memory name: use letters, digits, '_', "
                         f"'.', '-' (at most 200 characters)")
    return f"/dev/shm/{name}"


AUTO_POOL_PREFIX = "kvrelay-store-0-"  # + pid: the pool of a daemon started with --port 0 and no --pool-name
DIRECTORY_SUFFIX = ".dir"  # the pool's shared directory of ready chunks is /dev/shm/<pool name>.dir (directory.py)


def unlink_pool(name: str) -> None:
    """Remove a dead daemon's pool segment and its directory from /dev/shm (either may be gone already)."""
    for n in (name, name + DIRECTORY_SUFFIX):
        try:
            os.unlink(shm_path(n))
        except FileNotFoundError:
            pass


def sweep_stale_pools() -> list[str]:
    """Unlink automatically named pools whose daemon is dead (killed with -9, it could not unlink its own)."""
    gone: list[str] = []
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return gone
    for name in names:
        pid = name[len(AUTO_POOL_PREFIX):].removesuffix(DIRECTORY_SUFFIX)  # the pool, or its directory
        if not name.startswith(AUTO_POOL_PREFIX) or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive (or a reused pid: keep it, to be safe)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            os.unlink(f"/dev/shm/{name}")
            gone.append(name)
        except OSError:
            pass
    return gone


class SharedPool:
    """A mapped shared-memory segment.  ``create=True`` makes (or replaces a stale) segment of ``nbytes``."""

    def __init__(self, name: str, nbytes: int = 0, *, create: bool = False, populate: bool = True) -> None:
        self.name = name
        self.path = shm_path(name)
        self.owner = create
        flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
        if create:
            if nbytes <= 0 or nbytes % ALIGN:
                raise ValueError(f"pool size must be a positive multiple of {ALIGN} bytes, got {nbytes}")
            try:
                os.unlink(self.path)  # a segment left behind by a daemon that was killed
            except FileNotFoundError:
                pass
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, nbytes)
                try:
                    os.posix_fallocate(fd, 0, nbytes)  # fail now, not with SIGBUS later, if /dev/shm is small
                except OSError as exc:
                    os.unlink(self.path)
                    raise ValueError(f"cannot allocate a {nbytes}-byte pool in /dev/shm ({exc}); lower "
                                     f"pool_size or enlarge /dev/shm") from None
                self.mm = mmap.mmap(fd, nbytes, flags=flags)
                st = os.fstat(fd)
            finally:
                os.close(fd)
        else:
            try:
                fd = os.open(self.path, os.O_RDWR)
            except FileNotFoundError:
                raise ValueError(f"store pool {self.path} does not exist: is the daemon running on this "
                                 f"host? (use a remote transport such as 'tcp' from another host)") from None
            try:
                size = os.fstat(fd).st_size
                if nbytes and size != nbytes:
                    raise ValueError(f"store pool {self.path} is {size} bytes, the daemon said {nbytes}")
                nbytes = size
                self.mm = mmap.mmap(fd, nbytes, flags=flags)
                st = os.fstat(fd)
            finally:
                os.close(fd)
        self.nbytes = nbytes
        self.ident = (st.st_dev, st.st_ino)  # which segment this is (a restarted daemon makes a new one)
        self._view: memoryview | None = memoryview(self.mm)

    @property
    def view(self) -> memoryview:
        """The whole pool as bytes (a ValueError once closed)."""
        if self._view is None:
            raise ValueError(f"store pool {self.path} is closed")
        return self._view

    def close(self) -> None:
        if self._view is None:
            return
        self._view.release()
        self._view = None
        try:
            self.mm.close()
        except BufferError:  # someone still holds a view (e.g. a tensor): leave it to the GC
            pass
        if self.owner:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class Arena:
    """First-fit allocator of ``ALIGN``-aligned ranges in ``[0, capacity)`` with coalescing frees."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0 or capacity % ALIGN:
            raise ValueError(f"arena capacity must be a positive multiple of {ALIGN}, got {capacity}")
        self.capacity = capacity
        self._starts: list[int] = [0]
        self._sizes: list[int] = [capacity]
        self.used = 0

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.used

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a fresh range of ``align_up(nbytes)`` bytes, or None if no free range is big enough."""
        size = align_up(max(nbytes, 1))
        for i, free in enumerate(self._sizes):
            if free >= size:
                off = self._starts[i]
                if free == size:
                    del self._starts[i], self._sizes[i]
                else:
                    self._starts[i] += size
                    self._sizes[i] -= size
                self.used += size
                return off
        return None

    def free(self, offset: int, nbytes: int) -> None:
        size = align_up(max(nbytes, 1))
        if offset < 0 or offset % ALIGN or offset + size > self.capacity:
            raise ValueError(f"free of [{offset}, {offset + size}) is outside the arena of {self.capacity}")
        i = bisect.bisect_left(self._starts, offset)
        if (i < len(self._starts) and self._starts[i] < offset + size) or \
                (i > 0 and self._starts[i - 1] + self._sizes[i - 1] > offset):
            raise ValueError(f"double free of pool range [{offset}, {offset + size})")
        self.used -= size
        if i > 0 and self._starts[i - 1] + self._sizes[i - 1] == offset:  # merge with the left neighbour
            i -= 1
            self._sizes[i] += size
        else:
            self._starts.insert(i, offset)
            self._sizes.insert(i, size)
        if i + 1 < len(self._starts) and self._starts[i] + self._sizes[i] == self._starts[i + 1]:
            self._sizes[i] += self._sizes[i + 1]
            del self._starts[i + 1], self._sizes[i + 1]

    def largest_free(self) -> int:
        return max(self._sizes, default=0)
