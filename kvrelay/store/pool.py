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

from kvrelay.proc import pid_alive, start_time

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
OWNER_SUFFIX = ".owner"  # /dev/shm/<pool name>.owner: "<pid> <start time>" of the daemon that created the pool
SWEPT_PREFIX = "kvrelay-"  # the sweep looks at nothing else in /dev/shm


def unlink_pool(name: str) -> None:
    """Remove a dead daemon's pool segment, its directory and its owner file from /dev/shm (any may be gone)."""
    for n in (name, name + DIRECTORY_SUFFIX, name + OWNER_SUFFIX):
        try:
            os.unlink(shm_path(n))
        except FileNotFoundError:
            pass


def owner_alive(pid: int, start: str | None = None) -> bool:
    """Whether process ``pid`` runs (and, given ``start``, is the one that started then, not a reused pid)."""
    return pid_alive(pid, start)


def write_owner(name: str) -> None:
    """Record this process as the owner of pool ``name`` (read by `sweep_stale_pools` in other processes)."""
    pid = os.getpid()
    path = shm_path(name) + OWNER_SUFFIX
    tmp = f"{path}.{pid}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{pid} {start_time(pid)}\n")
    os.replace(tmp, path)


def read_owner(name: str) -> tuple[int, str | None] | None:
    """(pid, start time) from pool ``name``'s owner file; None if there is none or it cannot be read."""
    try:
        with open(shm_path(name) + OWNER_SUFFIX) as f:
            pid, start = f.read().split()
        return int(pid), None if start == "None" else start
    except (OSError, ValueError):
        return None


def sweep_stale_pools() -> list[str]:
    """Unlink the pools (segment, directory, owner file) of store daemons that are gone: killed with -9, they
    could not unlink their own.  A pool's owner is read from its owner file (or, for an automatically named
    pool, from its name); a pool whose owner cannot be told, or is alive, is never touched."""
    gone: list[str] = []
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return gone
    for name in names:
        if not name.startswith(SWEPT_PREFIX):
            continue
        owner: tuple[int, str | None] | None = None
        if name.endswith(OWNER_SUFFIX):
            base = name.removesuffix(OWNER_SUFFIX)
            owner = read_owner(base)
        elif name.startswith(AUTO_POOL_PREFIX):
            base = name.removesuffix(DIRECTORY_SUFFIX)
            pid = base[len(AUTO_POOL_PREFIX):]
            owner = (int(pid), None) if pid.isdigit() else None
        if owner is None or owner_alive(*owner) or base in gone:
            continue
        unlink_pool(base)
        gone.append(base)
    return gone


def check_fits(nbytes: int) -> None:
    """ValueError unless a pool of ``nbytes`` fits in this host's memory and in /dev/shm's free space (found
    out now, not by filling /dev/shm page by page until the allocation fails)."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if nbytes > memory:
        raise ValueError(f"pool_size {nbytes} bytes is more than this host's memory ({memory} bytes); lower "
                         f"pool_size")
    st = os.statvfs("/dev/shm")
    if nbytes > st.f_bavail * st.f_frsize:
        raise ValueError(f"pool_size {nbytes} bytes is more than /dev/shm has free ({st.f_bavail * st.f_frsize} "
                         f"bytes); lower pool_size or enlarge /dev/shm")


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
            check_fits(nbytes)
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
            write_owner(name)
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
            for path in (self.path, self.path + OWNER_SUFFIX):
                try:
                    os.unlink(path)
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

    def free_ranges(self) -> list[tuple[int, int]]:
        """(offset, size) of every free range, in order (a purge overwrites them: purge.py)."""
        return list(zip(self._starts, self._sizes, strict=True))
