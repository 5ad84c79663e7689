"""The SSD tier's on-disk format: record heads, journal frames, verification, and the O_DIRECT probe.

Owns: byte layouts only (see ssd.py for the files and their life cycle).  Must not touch: files'
placement, the pool or the index.

Record = one ALIGN-byte head block + payload padded to ALIGN (so both can be written with O_DIRECT
straight from the page-aligned pool):
    head: "KVR1" | u32 keylen | u32 hdrlen | u64 nbytes | key | msgpack ChunkHeader | ... | u64 xxh3(head[:-8])
The payload's xxh3 is the ChunkHeader's checksum.  Journal frames are ``u32 len | u64 xxh3(body) | body``
with a msgpack `JEntry` body.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from pathlib import Path

import msgspec
import xxhash

from kvrelay.keys import ChunkKey
from kvrelay.store.pool import ALIGN
from kvrelay.transfer.wire import ChunkHeader, checksum, decode_header

HEAD = struct.Struct("<4sIIQ")
FRAME = struct.Struct("<IQ")
MAGIC = b"KVR1"
RECOVER_WINDOW = 16 << 20  # recovery reads segments sequentially in windows of this size


class Loc(msgspec.Struct, frozen=True, array_like=True):
    seg: int
    offset: int
    nbytes: int  # payload bytes (the record spans ALIGN + align_up(nbytes))


class JEntry(msgspec.Struct, frozen=True, array_like=True):
    op: str  # "add" | "del" | "dropseg"
    key: str = ""
    loc: Loc | None = None


class Recovered(msgspec.Struct):
    key: ChunkKey
    header: ChunkHeader
    loc: Loc


JENC = msgspec.msgpack.Encoder()
JDEC = msgspec.msgpack.Decoder(JEntry)


def parse_key(s: str) -> ChunkKey:
    h, layer, hs, he = s.split(":")
    return ChunkKey(h, int(layer), int(hs), int(he))


def verify_record(rec: memoryview, kstr: str, loc: Loc) -> Recovered | None:
    """Check one record (head + padded payload) read back from a segment; None if torn or corrupt."""
    try:
        if len(rec) < ALIGN + loc.nbytes:
            return None
        head = rec[:ALIGN]
        if head[:4] != MAGIC or xxhash.xxh3_64_intdigest(head[:-8]) != struct.unpack("<Q", head[-8:])[0]:
            return None
        _, klen, hlen, nbytes = HEAD.unpack_from(head)
        off = HEAD.size
        if bytes(head[off:off + klen]).decode() != kstr or nbytes != loc.nbytes:
            return None
        header = decode_header(bytes(head[off + klen: off + klen + hlen]))
        if header.nbytes != nbytes or checksum(rec[ALIGN:ALIGN + nbytes]) != header.checksum:
            return None
        return Recovered(parse_key(kstr), header, loc)
    except (ValueError, UnicodeDecodeError, struct.error):
        return None


def frame(e: JEntry) -> bytes:
    body = JENC.encode(e)
    return FRAME.pack(len(body), xxhash.xxh3_64_intdigest(body)) + body


def probe_direct(directory: Path, nbytes: int = 32 << 20, block: int = 4 << 20) -> tuple[bool, float, float]:
    """Write ``nbytes`` with and without O_DIRECT; returns (O_DIRECT works, direct GB/s, buffered GB/s)."""
    buf = mmap.mmap(-1, block)
    buf.write(os.urandom(4096) * (block // 4096))
    rates: list[float] = []
    ok = True
    for direct in (True, False):
        path = directory / f".probe-{os.getpid()}-{int(direct)}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0), 0o600)
        except OSError:
            ok, rates = False, rates + [0.0]
            continue
        try:
            t0 = time.perf_counter()
            for off in range(0, nbytes, block):
                os.pwrite(fd, buf, off)
            if not direct:
                os.fdatasync(fd)  # buffered writes only count once they reach the device
            rates.append(nbytes / (time.perf_counter() - t0) / 1e9)
        except OSError:
            ok, rates = False, rates + [0.0]
        finally:
            os.close(fd)
            path.unlink(missing_ok=True)
    buf.close()
    return ok, rates[0], rates[1]
