"""The ready-chunk directory: where each READY in-memory chunk sits in the pool, in shared memory, so a
same-host client can pull it with no round trip to the daemon.

Owns: the table's layout, the daemon's writes (`Directory`, under the store's lock) and the clients'
lock-free reads (`DirectoryReader`, a read-only mapping).  Must not touch: the index's rules (index.py
calls `put`/`drop` when a chunk gains or loses its in-memory copy) or the pool's bytes.

Why: a same-host pull was a control round trip plus one copy.  On these VMs the round trip costs
100-250 us after the copy has evicted the daemon from the caches, against 200-300 us for the copy of a
4 MiB chunk, so a single pull ran at 0.3-0.45x a plain copy.

Liveness: a client must not go on reading a dead daemon's memory (it would never notice the daemon went
away, nor a restarted one).  The first HEAD_BYTES hold a magic word and the daemon's heartbeat (its loop
writes CLOCK_MONOTONIC every pass, at least every 0.25 s); a reader uses the directory only while the
heartbeat is under STALE_S old and the file at its path is still the one it mapped (a restarted daemon
makes a new one).  Otherwise it asks the daemon, which is how it learns of the death or the restart.

Layout: after the head, ``slots`` rows of ROW_BYTES, open addressing with linear probing (at most
MAX_PROBE rows from a key's home row).  A row is ``seq, h1, h2, offset, nbytes, header length``
(little-endian u64) and the msgpack-encoded ChunkHeader.  ``h1, h2`` are the xxh3-128 of the chunk id;
``h1`` is 0 for an empty row (deletes shift later rows of the run back: no tombstones).  The head also
holds the (st_dev, st_ino) of the pool segment the offsets point into: a client that mapped the pool of
one daemon and the directory of the next (a restart between its two opens) does not use the directory.

Reads are a seqlock: the single writer (the daemon) makes ``seq`` odd, writes the row, makes it even
again.  A reader takes an even ``seq``, reads the row, copies the chunk out of the pool, and keeps the
copy only if ``seq`` is unchanged.  The daemon drops a chunk's row before its pool range can be handed to
anyone else (both under the store's lock, before any reply), so a copy that raced an eviction, a delete
or a purge fails that check and the client falls back to asking the daemon.  The copy is also verified
against the row's checksum, as every pull is.  The daemon offers the directory on x86-64 only: the
seqlock counts on stores becoming visible in program order (numpy writes each word with one store).
What a reader skips, it reports later (`touched`, piggybacked on its next request): the daemon moves those
chunks up its LRU and counts them as pulls.
"""

from __future__ import annotations

import mmap
import os
import time

import msgspec
import numpy as np
import numpy.typing as npt
import xxhash

from kvrelay.store.pool import DIRECTORY_SUFFIX
from kvrelay.transfer.wire import ChunkHeader

HEAD_BYTES = 4096  # magic, heartbeat (ns, CLOCK_MONOTONIC), pool segment st_dev, st_ino
MAGIC = 0x3179616C6572766B  # b"kvrelay1" little-endian
STALE_S = 1.0
ROW_BYTES = 256
HEAD_WORDS = 6  # seq, h1, h2, offset, nbytes, header length
MAX_HEADER = ROW_BYTES - 8 * HEAD_WORDS
MAX_PROBE = 32
EMPTY = 0
MIN_SLOTS = 1024
MAX_SLOTS = 1 << 20  # 256 MiB of rows (pools up to 32 GiB get 2 per 64 KiB); past it, fewer rows per byte
SUFFIX = DIRECTORY_SUFFIX

Words = npt.NDArray[np.uint64]  # the head (4 words) and the rows (slots x ROW_BYTES // 8), over the mapping

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(ChunkHeader)


def key_hash(kid: str) -> tuple[int, int]:
    """(h1, h2) of a chunk id; h1 never EMPTY."""
    h = xxhash.xxh3_128_intdigest(kid.encode())
    h1, h2 = h & 0xFFFF_FFFF_FFFF_FFFF, h >> 64
    return (h1 if h1 != EMPTY else 1), h2


def slots_for(pool_bytes: int) -> int:
    """Rows for a pool: twice as many as 64 KiB chunks would fill it (a power of two, at least MIN_SLOTS).
    A chunk that finds no row is still pulled, through the daemon."""
    want = min(2 * pool_bytes // (64 << 10), MAX_SLOTS)
    n = MIN_SLOTS
    while n < want:
        n *= 2
    return n


class Directory:
    """The daemon's side: creates ``/dev/shm/<pool name>.dir`` and writes it (caller holds the store lock)."""

    def __init__(self, pool_name: str, slots: int, pool_ident: tuple[int, int]) -> None:
        if slots < 1 or slots & (slots - 1):
            raise ValueError(f"directory slots must be a power of two, got {slots}")
        self.name = pool_name + SUFFIX
        self.path = f"/dev/shm/{self.name}"
        self.slots = slots
        size = HEAD_BYTES + slots * ROW_BYTES
        tmp = f"{self.path}.{os.getpid()}.tmp"  # complete before it appears under its name (rename below)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, size)  # now, not as a SIGBUS on a later write if /dev/shm is small
            except OSError as exc:
                os.unlink(tmp)
                raise ValueError(f"cannot allocate the {size}-byte store directory in /dev/shm ({exc}); enlarge "
                                 f"/dev/shm or start the store with --no-directory") from None
            self.mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self._head: Words | None = np.frombuffer(self.mm, dtype=np.uint64, count=4)
        self._rows: Words | None = np.frombuffer(self.mm, dtype=np.uint64, offset=HEAD_BYTES).reshape(
            slots, ROW_BYTES // 8)
        self.head[2], self.head[3] = pool_ident  # which pool segment the rows' offsets point into
        self.beat()
        self.head[0] = MAGIC
        os.replace(tmp, self.path)  # replaces one a killed daemon left behind
        self.where: dict[str, int] = {}  # kid -> row
        self.kid_at: dict[int, str] = {}  # row -> kid
        self.full = 0  # chunks that found no row within MAX_PROBE (pulled through the daemon)

    @property
    def head(self) -> Words:
        if self._head is None:
            raise ValueError(f"store directory {self.path} is closed")
        return self._head

    @property
    def rows(self) -> Words:
        if self._rows is None:
            raise ValueError(f"store directory {self.path} is closed")
        return self._rows

    def beat(self) -> None:
        """The daemon is alive (its loop calls this every pass)."""
        self.head[1] = time.monotonic_ns()

    def put(self, kid: str, offset: int, nbytes: int, header: ChunkHeader | None) -> None:
        """Publish (or move) a READY chunk's in-memory copy."""
        self.drop(kid)
        if header is None:
            return
        hb = _enc.encode(header)
        if len(hb) > MAX_HEADER:
            self.full += 1
            return
        h1, h2 = key_hash(kid)
        mask = self.slots - 1
        for i in range(MAX_PROBE):
            r = (h1 + i) & mask
            if int(self.rows[r, 1]) == EMPTY:
                hdr = np.zeros(ROW_BYTES // 8 - HEAD_WORDS, dtype=np.uint64)
                hdr.view(np.uint8)[:len(hb)] = np.frombuffer(hb, dtype=np.uint8)
                self._write(r, [h1, h2, offset, nbytes, len(hb)], hdr, kid)
                return
        self.full += 1

    def _write(self, r: int, fields: list[int], hdr: Words, kid: str) -> None:
        """Rewrite row ``r`` under its seqlock: odd while being written, even (and different) after."""
        row = self.rows[r]
        row[0] += 1
        row[1:HEAD_WORDS] = fields
        row[HEAD_WORDS:] = hdr
        row[0] += 1
        self.where[kid] = r
        self.kid_at[r] = kid

    def drop(self, kid: str) -> None:
        """The chunk's in-memory copy is going (evicted, deleted, purged, expired): its row goes first.  Rows
        of the same probe run move back into the hole (linear probing's backward-shift delete), so the table
        keeps no tombstones and a miss stops at the first empty row.  Every row rewritten gets a new seq: a
        reader that was copying from one throws its copy away."""
        hole = self.where.pop(kid, None)
        if hole is None:
            return
        del self.kid_at[hole]
        mask = self.slots - 1
        j = hole
        for _ in range(self.slots):
            j = (j + 1) & mask
            h = int(self.rows[j, 1])
            if h == EMPTY:
                break
            home = h & mask
            # the row at j may fill the hole unless its home lies cyclically in (hole, j]
            if (hole < j and hole < home <= j) or (hole > j and (home > hole or home <= j)):
                continue
            moved = self.kid_at.pop(j)
            self._write(hole, [int(v) for v in self.rows[j, 1:HEAD_WORDS]], self.rows[j, HEAD_WORDS:].copy(), moved)
            hole = j
        row = self.rows[hole]
        row[0] += 1
        row[1] = EMPTY
        row[0] += 1

    def close(self) -> None:
        if self._head is None:
            return
        self._head[1] = 0  # stale at once for every reader
        self._head = self._rows = None  # the mapping's views go, so that it can be closed
        try:
            self.mm.close()
        except BufferError:
            pass
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class DirectoryReader:
    """A client's read-only mapping of the daemon's directory."""

    def __init__(self, name: str, slots: int, pool_ident: tuple[int, int]) -> None:
        self.path = f"/dev/shm/{name}"
        fd = os.open(self.path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            if st.st_size != HEAD_BYTES + slots * ROW_BYTES:
                raise ValueError(f"store directory {self.path} is {st.st_size} bytes, expected {slots} rows")
            self.ino = (st.st_dev, st.st_ino)
            self.mm = mmap.mmap(fd, HEAD_BYTES + slots * ROW_BYTES, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self.slots = slots
        head = np.frombuffer(self.mm, dtype=np.uint64, count=4)
        if int(head[0]) != MAGIC:
            raise ValueError(f"store directory {self.path} has no kvrelay header")
        if (int(head[2]), int(head[3])) != tuple(pool_ident):  # a restart between the two opens
            raise ValueError(f"store directory {self.path} belongs to another pool segment than the one mapped")
        self.head: Words | None = head  # None once closed
        self.rows: Words | None = np.frombuffer(self.mm, dtype=np.uint64, offset=HEAD_BYTES).reshape(
            slots, ROW_BYTES // 8)

    def live(self) -> bool:
        """The daemon beat recently and its directory is still the file mapped here."""
        head = self.head
        if head is None or time.monotonic_ns() - int(head[1]) > STALE_S * 1e9:
            return False
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.ino

    def find(self, kid: str, check_live: bool = True) -> tuple[int, int, int, ChunkHeader] | None:
        """(row, seq, offset, header) of a ready in-memory chunk, or None (absent, or being rewritten: ask the
        daemon).  Valid only if `still(row, seq)` holds after the bytes were copied.  ``check_live=False``: the
        caller checked `live()` for a batch."""
        try:
            return self._find(kid, check_live)
        except (TypeError, ValueError):  # closed under us (the client is closing)
            return None

    def _find(self, kid: str, check_live: bool) -> tuple[int, int, int, ChunkHeader] | None:
        if check_live and not self.live():
            return None
        h1, h2 = key_hash(kid)
        mask = self.slots - 1
        rows = self.rows
        if rows is None:  # closed
            return None
        for i in range(MAX_PROBE):
            r = (h1 + i) & mask
            row = rows[r]
            seq = int(row[0])
            k = int(row[1])
            if k == EMPTY:
                return None
            if k != h1 or int(row[2]) != h2:
                continue
            if seq & 1:
                return None
            offset, nbytes, hlen = int(row[3]), int(row[4]), int(row[5])
            if hlen > MAX_HEADER:
                return None
            try:
                at = HEAD_BYTES + r * ROW_BYTES + 8 * HEAD_WORDS
                header = _dec.decode(self.mm[at:at + hlen])
            except (msgspec.DecodeError, msgspec.ValidationError):
                return None  # torn by a concurrent rewrite
            if int(row[0]) != seq or header.nbytes != nbytes:
                return None
            return r, seq, offset, header
        return None

    def still(self, r: int, seq: int) -> bool:
        rows = self.rows
        return rows is not None and int(rows[r, 0]) == seq

    def close(self) -> None:
        self.head = self.rows = None
        try:
            self.mm.close()
        except BufferError:
            pass
