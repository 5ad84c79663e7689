"""The SSD tier: append-only segment files of self-checking records plus an index journal.

Owns: the files under ``ssd_dir`` (``seg-NNNNNNNN.kvs`` and ``journal.log``), record format, recovery
and segment reclamation.  Must not touch: the pool allocator or the in-memory index (the caller moves
entries between tiers; this module only stores and returns bytes).

Records and journal frames are laid out in ssd_format.py.  A record counts only once its journal frame
("add", after the record is written) exists; frames are ``u32 len | u64 xxh3(body) | body``.  After a
crash, replay stops at the first torn frame, and every surviving record is re-read and verified: a torn
or flipped record is dropped.  Space is reclaimed a whole segment at a time, oldest first.

At rest (``keyring``, crypto.py): payloads are sealed with AES-GCM as they are written, bound to their
chunk id and tenant, and opened as they are read back (recovery included): a record that does not open is
corrupt, dropped and counted like a failed checksum.  A dropped record's head is overwritten with zeros (its
nonce and tag go with it: an encrypted payload can no longer be opened, even with the key); `scrub`
(a tenant's purge) overwrites the whole record, and `purged` writes the purge in the journal.
"""

from __future__ import annotations

import io
import mmap
import os
import threading
import time
from pathlib import Path

import msgspec
import xxhash

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from kvrelay.keys import ChunkKey
from kvrelay.store.crypto import TAG_BYTES, KeyRing, associated_data
from kvrelay.store.pool import ALIGN, align_up
from kvrelay.store.ssd_format import (FRAME, JDEC, RECOVER_WINDOW, JEntry, Loc, Recovered, Sealed, frame,
                                      pack_head, parse_key, probe_direct, verify_record)
from kvrelay.transfer.wire import ChunkHeader, encode_header
from kvrelay.transfer.wire import checksum as chunk_checksum

__all__ = ["SsdTier", "SsdFullError", "Loc", "Recovered", "parse_key", "probe_direct"]


DIRECT_BIAS = 0.8
SEAL_PIECE = 1 << 20  # sealed payloads are encrypted and written this much at a time (a multiple of ALIGN)
JOURNAL_COMPACT_MIN = 65536  # frames; below this the journal is never compacted while running


class SsdFullError(OSError):
    """A spill could not get disk space; ``evicted`` lists keys whose records were reclaimed meanwhile."""

    def __init__(self, errno_: int | None, message: str, evicted: list[str]) -> None:
        super().__init__(errno_, message)
        self.evicted = evicted


class SsdTier:
    def __init__(self, directory: str, capacity: int, segment_size: int, direct: str = "auto",
                 fsync: bool = False, keyring: KeyRing | None = None) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.capacity = capacity
        self.segment_size = segment_size
        self.fsync = fsync
        self._lock = threading.Lock()
        self._head = mmap.mmap(-1, ALIGN)  # page-aligned staging for record heads
        self._live: dict[int, dict[str, Loc]] = {}  # seg -> key -> loc
        self._fds: dict[int, int] = {}
        self._cur = -1
        self._pos = 0
        self.bytes_written = 0
        self.write_seconds = 0.0
        self.bytes_read = 0
        self.read_seconds = 0.0
        self.direct = self._decide_direct(direct)
        self._journal: io.FileIO | None = None  # opened by recover()
        self._frames = 0
        self.keyring = keyring
        self._sealed: dict[int, dict[int, Sealed]] = {}  # seg -> offset -> how its payload was sealed
        self._wstage = _Buffer()  # ciphertext being written (under _lock)
        self._rstage = _Buffer()  # ciphertext being read (the promoter's thread, or recovery before it starts)
        self._rplain = _Buffer()  # recovery: plaintext opened to verify its checksum
        self._zero = mmap.mmap(-1, ALIGN)  # a head's worth of zeros, page-aligned (O_DIRECT)
        self._writer: ThreadPoolExecutor | None = None  # writes sealed pieces while the next is encrypted

    # --- O_DIRECT decision -------------------------------------------------------------------------
    def _decide_direct(self, mode: str) -> bool:
        if mode == "off" or not hasattr(os, "O_DIRECT"):
            return False
        cache = self.dir / "probe.json"  # measured once per directory, not at every start
        try:
            self.probe = msgspec.json.decode(cache.read_bytes())
            ok, direct_rate, buffered_rate = self.probe["ok"], self.probe["direct_gbps"], self.probe["buffered_gbps"]
        except (OSError, msgspec.DecodeError, KeyError, TypeError):
            ok, direct_rate, buffered_rate = probe_direct(self.dir)
            self.probe = {"ok": ok, "direct_gbps": direct_rate, "buffered_gbps": buffered_rate}
            cache.write_bytes(msgspec.json.encode(self.probe))
        if mode == "on":
            if not ok:
                raise ValueError(f"ssd_direct=on but {self.dir} does not support O_DIRECT; use auto or off")
            return True
        # O_DIRECT unless buffered (with its writeback forced by fdatasync) is clearly faster: it keeps the
        # page cache from holding a second copy of what the pool already holds
        return ok and direct_rate >= DIRECT_BIAS * buffered_rate

    def _open_seg(self, seg: int, create: bool) -> int:
        path = self.dir / f"seg-{seg:08d}.kvs"
        flags = os.O_RDWR | (os.O_CREAT if create else 0) | (os.O_DIRECT if self.direct else 0)
        fd = os.open(path, flags, 0o600)
        self._fds[seg] = fd
        return fd

    # --- recovery ----------------------------------------------------------------------------------
    def recover(self) -> tuple[list[Recovered], int]:
        """Replay the journal, verify every surviving record; returns (chunks, number dropped)."""
        jpath = self.dir / "journal.log"
        live: dict[str, Loc] = {}
        if jpath.exists():
            data = jpath.read_bytes()
            pos = 0
            while pos + FRAME.size <= len(data):
                n, crc = FRAME.unpack_from(data, pos)
                body = data[pos + FRAME.size: pos + FRAME.size + n]
                if len(body) != n or xxhash.xxh3_64_intdigest(body) != crc:
                    break  # torn tail
                pos += FRAME.size + n
                e = JDEC.decode(body)
                if e.op == "add" and e.loc is not None:
                    live[e.key] = e.loc
                elif e.op == "del":
                    live.pop(e.key, None)
                elif e.op == "dropseg" and e.loc is not None:
                    live = {k: v for k, v in live.items() if v.seg != e.loc.seg}
        segs = {int(p.stem[4:]) for p in self.dir.glob("seg-*.kvs")}
        by_seg: dict[int, list[tuple[str, Loc]]] = {}
        for kstr, loc in live.items():
            by_seg.setdefault(loc.seg, []).append((kstr, loc))
        out: list[Recovered] = []
        dropped = 0
        for seg, items in by_seg.items():
            if seg not in segs:
                dropped += len(items)
                continue
            self._open_seg(seg, create=False)
            with open(self.dir / f"seg-{seg:08d}.kvs", "rb", buffering=0) as fh:  # sequential windows
                win, win_start = b"", 0
                for kstr, loc in sorted(items, key=lambda kv: kv[1].offset):
                    end = loc.offset + ALIGN + align_up(max(loc.nbytes, 1))
                    if loc.offset < win_start or end > win_start + len(win):
                        fh.seek(loc.offset)
                        win, win_start = fh.read(max(RECOVER_WINDOW, end - loc.offset)), loc.offset
                    rec = verify_record(memoryview(win)[loc.offset - win_start:end - win_start], kstr, loc,
                                        self._unseal)
                    if rec is None:
                        dropped += 1
                        continue
                    out.append(rec)
                    self._live.setdefault(seg, {})[kstr] = loc
                    if rec.sealed is not None:
                        self._sealed.setdefault(seg, {})[loc.offset] = rec.sealed
        for seg in segs - set(self._live):  # segments with nothing live
            self._remove_seg(seg)
        self._cur = max(segs, default=-1)
        self._pos = self.segment_size  # always start a fresh segment after recovery
        self._rewrite_journal()
        return out, dropped

    def _unseal(self, sealed: Sealed, ciphertext: memoryview) -> memoryview | None:
        """Recovery: the plaintext of a sealed payload (a view of a scratch buffer), or None."""
        if self.keyring is None:
            return None
        n = len(ciphertext)
        stage = self._rstage.get(n + TAG_BYTES)
        stage[:n] = ciphertext
        stage[n:n + TAG_BYTES] = sealed.tag
        plain = self._rplain.get(n + TAG_BYTES)
        if not self.keyring.open(sealed.key_id, sealed.nonce, stage[:n + TAG_BYTES],
                                 associated_data(sealed.kid, sealed.tenant), plain):
            return None
        return plain[:n]

    def records_by_key(self) -> Counter[int]:
        """Live sealed records per key id (0: plaintext): an old key may leave the key file at 0."""
        with self._lock:
            sealed = Counter(s.key_id for recs in self._sealed.values() for s in recs.values())
            sealed[0] = sum(map(len, self._live.values())) - sum(sealed.values())
            return sealed

    def _rewrite_journal(self) -> None:
        jpath = self.dir / "journal.log"
        tmp = self.dir / "journal.log.tmp"
        with open(tmp, "wb") as fh:
            for seg in sorted(self._live):
                for k, loc in self._live[seg].items():
                    fh.write(frame(JEntry("add", k, loc)))
            fh.flush()
            os.fsync(fh.fileno())
        if self._journal is not None:
            self._journal.close()
        os.replace(tmp, jpath)
        self._journal = open(jpath, "ab", buffering=0)
        self._frames = sum(map(len, self._live.values()))

    # --- write / read / drop -----------------------------------------------------------------------
    def append(self, key: ChunkKey, header: ChunkHeader, payload: memoryview, tenant: str = "") -> tuple[Loc, list[str]]:
        """Write one record (``payload`` must be ALIGN-padded, page-aligned memory such as a pool slot), sealed
        if the tier has a key ring.  Returns its location and the keys dropped by reclaiming old segments to
        make room."""
        kstr = key.encode().decode()
        hb = encode_header(header)
        nbytes = header.nbytes
        padded = align_up(max(nbytes, 1))
        if len(payload) < padded:
            raise ValueError(f"payload view of {len(payload)} bytes is shorter than the padded {padded}")
        with self._lock:
            evicted: list[str] = []
            if self._pos + ALIGN + padded > self.segment_size:
                evicted = self._next_segment()
            fd, off = self._fds[self._cur], self._pos
            t0 = time.perf_counter()
            sealed: Sealed | None = None
            h = self._head
            if self.keyring is None:
                pack_head(memoryview(h), kstr, hb, nbytes, tenant, None)
                n = os.pwritev(fd, [h, payload[:padded]], off)
            else:  # the payload sealed and written piece by piece, then the head (it holds the tag)
                sealed = self._seal_write(fd, off + ALIGN, payload[:nbytes], padded, kstr, tenant)
                pack_head(memoryview(h), kstr, hb, nbytes, tenant, sealed)
                n = os.pwrite(fd, h, off) + padded
            if n != ALIGN + padded:
                raise OSError(f"short write to SSD segment {self._cur}: {n} of {ALIGN + padded} bytes")
            if self.fsync:
                os.fdatasync(fd)
            self.write_seconds += time.perf_counter() - t0
            self.bytes_written += ALIGN + padded
            self._pos += ALIGN + padded
            loc = Loc(self._cur, off, nbytes)
            self._journal_write(JEntry("add", kstr, loc))
            self._live.setdefault(self._cur, {})[kstr] = loc
            if sealed is not None:
                self._sealed.setdefault(self._cur, {})[off] = sealed
            return loc, evicted

    def _seal_write(self, fd: int, at: int, plain: memoryview, padded: int, kid: str, tenant: str) -> Sealed:
        """Encrypt ``plain`` into the write stage and write it at ``at``, SEAL_PIECE bytes at a time: a piece is
        written (on the writer thread: the write releases the GIL) while the next one is encrypted, so sealing
        costs about max(encrypt, write), not their sum (was 0.69x an unsealed spill here, written after)."""
        assert self.keyring is not None
        key_id, nonce, enc = self.keyring.sealer(associated_data(kid, tenant))
        stage = self._wstage.get(padded + TAG_BYTES)
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="kvrelay-ssd-seal")
        n = len(plain)
        writes = []
        try:
            for pos in range(0, n, SEAL_PIECE):
                end = min(n, pos + SEAL_PIECE)
                enc.update_into(plain[pos:end], stage[pos:end + TAG_BYTES - 1])
                stop = end if end < n else padded  # the last piece carries the padding (O_DIRECT: whole pages)
                writes.append(self._writer.submit(_pwrite_all, fd, stage[pos:stop], at + pos))
            enc.finalize()
        finally:
            for w in writes:
                w.result()  # raises the first failed write
        return Sealed(key_id, nonce, enc.tag, kid, tenant)

    def _next_segment(self) -> list[str]:
        evicted: list[str] = []
        max_segs = max(1, self.capacity // self.segment_size)
        while len(self._fds) >= max_segs:  # reclaim the oldest segment
            oldest = min(self._fds)
            evicted += list(self._live.get(oldest, {}))
            self._journal_write(JEntry("dropseg", "", Loc(oldest, 0, 0)))
            self._remove_seg(oldest)
        seg, fd = self._cur + 1, -1
        try:
            fd = self._open_seg(seg, create=True)
            os.posix_fallocate(fd, 0, self.segment_size)
        except OSError as exc:
            if fd >= 0:
                os.close(self._fds.pop(seg))
            (self.dir / f"seg-{seg:08d}.kvs").unlink(missing_ok=True)
            self._pos = self.segment_size  # try a fresh segment again on the next spill
            raise SsdFullError(exc.errno, f"SSD tier {self.dir}: cannot create segment {seg} of "
                                          f"{self.segment_size} bytes ({exc.strerror}); free disk space or "
                                          f"lower ssd_size", evicted) from None
        self._cur, self._pos = seg, 0
        return evicted

    def _remove_seg(self, seg: int) -> None:
        fd = self._fds.pop(seg, None)
        if fd is not None:
            os.close(fd)
        self._live.pop(seg, None)
        self._sealed.pop(seg, None)
        (self.dir / f"seg-{seg:08d}.kvs").unlink(missing_ok=True)

    def read_into(self, loc: Loc, out: memoryview, checksum: int) -> bool:
        """Read a record's payload into ``out`` (page-aligned, >= align_up(nbytes)); False if corrupt."""
        with self._lock:
            fd = self._fds.get(loc.seg)
            sealed = self._sealed.get(loc.seg, {}).get(loc.offset)
        if fd is None:
            return False
        t0 = time.perf_counter()
        n = loc.nbytes
        padded = align_up(max(n, 1))
        if sealed is not None:
            if self.keyring is None:
                return False
            stage = self._rstage.get(padded + TAG_BYTES)
            try:
                got = os.preadv(fd, [stage[:padded]], loc.offset + ALIGN)
            except OSError:
                return False
            stage[n:n + TAG_BYTES] = sealed.tag
            if got < n or not self.keyring.open(sealed.key_id, sealed.nonce, stage[:n + TAG_BYTES],
                                                associated_data(sealed.kid, sealed.tenant), out):
                return False
        else:
            try:
                got = os.preadv(fd, [out[:padded]], loc.offset + ALIGN)
            except OSError:
                return False
        self.read_seconds += time.perf_counter() - t0
        self.bytes_read += padded
        return got >= n and chunk_checksum(out[:n]) == checksum

    def drop(self, key: ChunkKey, loc: Loc, scrub: bool = False) -> None:
        """Forget a record: its head is zeroed (with ``scrub``, its payload too) and the journal says so."""
        kstr = key.encode().decode()
        with self._lock:
            live = self._live.get(loc.seg)
            if live is not None and (got := live.pop(kstr, None)) is not None:
                loc = got  # the record the segment holds for this key
                self._sealed.get(loc.seg, {}).pop(loc.offset, None)
                fd = self._fds.get(loc.seg)
                if fd is not None:
                    size = ALIGN + align_up(max(loc.nbytes, 1)) if scrub else ALIGN
                    zeros = self._zero if not scrub else mmap.mmap(-1, size)
                    try:
                        os.pwrite(fd, zeros, loc.offset)
                    except OSError:  # the journal still forgets it; recovery would not trust it either way
                        pass
                    finally:
                        if zeros is not self._zero:
                            zeros.close()
                self._journal_write(JEntry("del", kstr, None))

    def purged(self, tenant: str) -> None:
        """After a tenant's records were scrubbed (drop(scrub=True)): make it durable -- the segments and a
        compacted journal (no frame of the purged chunks left) synced -- and record the purge in the journal."""
        with self._lock:
            for fd in self._fds.values():
                os.fdatasync(fd)
            self._rewrite_journal()
            self._journal_write(JEntry("purge", tenant, None))
            if self._journal is not None:
                os.fdatasync(self._journal.fileno())

    def _journal_write(self, e: JEntry) -> None:
        """Append a frame (caller holds the lock); compact once dead frames dominate the journal."""
        journal = self._journal
        if journal is None:
            raise RuntimeError(f"SSD tier {self.dir}: recover() opens the journal and must run before any write")
        journal.write(frame(e))
        if self.fsync:
            os.fdatasync(journal.fileno())
        self._frames += 1
        if self._frames > JOURNAL_COMPACT_MIN and self._frames > 4 * sum(map(len, self._live.values())):
            self._rewrite_journal()

    @property
    def used_bytes(self) -> int:
        return len(self._fds) * self.segment_size

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            if self._journal:
                self._journal.close()
            self._head.close()
            self._zero.close()
            if self._writer is not None:
                self._writer.shutdown()
            for b in (self._wstage, self._rstage, self._rplain):
                b.close()


def _pwrite_all(fd: int, data: memoryview, at: int) -> None:
    n = os.pwrite(fd, data, at)
    if n != len(data):
        raise OSError(f"short write to an SSD segment: {n} of {len(data)} bytes at {at}")


class _Buffer:
    """A page-aligned scratch buffer that grows to the largest size asked for (O_DIRECT-safe)."""

    def __init__(self) -> None:
        self._mm: mmap.mmap | None = None

    def get(self, nbytes: int) -> memoryview:
        if self._mm is None or len(self._mm) < nbytes:  # the old one goes with its last view
            self._mm = mmap.mmap(-1, align_up(max(nbytes, 1)))
        return memoryview(self._mm)

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass
            self._mm = None
