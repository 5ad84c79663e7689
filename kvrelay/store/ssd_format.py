"""The SSD tier's on-disk format: record heads, journal frames, verification, and the O_DIRECT probe.

Owns: byte layouts only (see ssd.py for the files and their life cycle).  Must not touch: files'
placement, the pool or the index.

Record = one ALIGN-byte head block + payload padded to ALIGN (so both can be written with O_DIRECT
straight from the page-aligned pool):
    head v1: "KVR1" | u32 keylen | u32 hdrlen | u64 nbytes | key | msgpack ChunkHeader | ... | u64 xxh3(head[:-8])
    head v2: "KVR2" | u32 keylen | u32 hdrlen | u64 nbytes | u32 tenantlen | u32 key id | 12-byte nonce |
             16-byte tag | key | msgpack ChunkHeader | tenant | ... | u64 xxh3(head[:-8])
The plaintext payload's xxh3 is the ChunkHeader's checksum.  v2 (what is written now; v1 records are still
read) names the chunk's tenant, and with key id > 0 the payload is AES-GCM ciphertext under that key of the
key file (crypto.py), bound to (chunk id, tenant); key id 0 is plaintext.  The head stays in clear: the
chunk id, its tenant and its header (with the plaintext's 64-bit xxh3) are readable on disk.  Journal frames are ``u32 len | u64 xxh3(body) | body``
with a msgpack `JEntry` body.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from pathlib import Path
from typing import Callable, NamedTuple

import msgspec
import xxhash

from kvrelay.keys import ChunkKey
from kvrelay.store.pool import ALIGN
from kvrelay.transfer.wire import ChunkHeader, checksum, decode_header

HEAD = struct.Struct("<4sIIQ")
HEAD2 = struct.Struct("<4sIIQII12s16s")
FRAME = struct.Struct("<IQ")
MAGIC = b"KVR1"
MAGIC2 = b"KVR2"
RECOVER_WINDOW = 16 << 20  # recovery reads segments sequentially in windows of this size


class Loc(msgspec.Struct, frozen=True, array_like=True):
    seg: int
    offset: int
    nbytes: int  # payload bytes (the record spans ALIGN + align_up(nbytes))


class JEntry(msgspec.Struct, frozen=True, array_like=True):
    op: str  # "add" | "del" | "dropseg" | "purge" (key: the tenant; a record of the purge, nothing to replay)
    key: str = ""
    loc: Loc | None = None


class Sealed(NamedTuple):
    """How an encrypted record's payload was sealed (crypto.py), and what it is bound to."""
    key_id: int
    nonce: bytes
    tag: bytes
    kid: str
    tenant: str


class Recovered(msgspec.Struct):
    key: ChunkKey
    header: ChunkHeader
    loc: Loc
    tenant: str = ""
    sealed: Sealed | None = None


class Head(NamedTuple):
    kid: str
    header: ChunkHeader
    nbytes: int
    tenant: str
    sealed: Sealed | None


def pack_head(h: memoryview, kid: str, hb: bytes, nbytes: int, tenant: str, sealed: Sealed | None) -> None:
    """Fill the ALIGN-byte head block ``h`` (v2) for a record of ``nbytes`` payload bytes."""
    kb, tb = kid.encode(), tenant.encode()
    if HEAD2.size + len(kb) + len(hb) + len(tb) + 8 > ALIGN:
        raise ValueError(f"chunk key + header + tenant of {len(kb) + len(hb) + len(tb)} bytes do not fit a "
                         f"record head")
    h[:] = bytes(ALIGN)
    key_id, nonce, tag = (sealed.key_id, sealed.nonce, sealed.tag) if sealed else (0, bytes(12), bytes(16))
    HEAD2.pack_into(h, 0, MAGIC2, len(kb), len(hb), nbytes, len(tb), key_id, nonce, tag)
    off = HEAD2.size
    for part in (kb, hb, tb):
        h[off:off + len(part)] = part
        off += len(part)
    h[ALIGN - 8:] = struct.pack("<Q", xxhash.xxh3_64_intdigest(h[:ALIGN - 8]))


def parse_head(head: memoryview) -> Head | None:
    """A record's head (v1 or v2), or None if torn or corrupt."""
    try:
        if len(head) < ALIGN or xxhash.xxh3_64_intdigest(head[:ALIGN - 8]) != struct.unpack("<Q", head[ALIGN - 8:ALIGN])[0]:
            return None
        magic = bytes(head[:4])
        if magic == MAGIC:
            _, klen, hlen, nbytes = HEAD.unpack_from(head)
            tlen, key_id, nonce, tag, off = 0, 0, b"", b"", HEAD.size
        elif magic == MAGIC2:
            _, klen, hlen, nbytes, tlen, key_id, nonce, tag = HEAD2.unpack_from(head)
            off = HEAD2.size
        else:
            return None
        kid = bytes(head[off:off + klen]).decode()
        header = decode_header(bytes(head[off + klen:off + klen + hlen]))
        tenant = bytes(head[off + klen + hlen:off + klen + hlen + tlen]).decode()
        sealed = Sealed(key_id, nonce, tag, kid, tenant) if key_id else None
        return Head(kid, header, nbytes, tenant, sealed)
    except (ValueError, UnicodeDecodeError, struct.error):
        return None


JENC = msgspec.msgpack.Encoder()
JDEC = msgspec.msgpack.Decoder(JEntry)


def parse_key(s: str) -> ChunkKey:
    h, layer, hs, he = s.split(":")
    return ChunkKey(h, int(layer), int(hs), int(he))


def verify_record(rec: memoryview, kstr: str, loc: Loc,
                  unseal: Callable[[Sealed, memoryview], memoryview | None] | None = None) -> Recovered | None:
    """Check one record (head + padded payload) read back from a segment; None if torn, corrupt, or sealed
    and not opened by ``unseal`` (given the record's sealing and ciphertext, it returns the plaintext or None:
    ssd.py's, with the key ring; without one, a sealed record cannot be read)."""
    if len(rec) < ALIGN + loc.nbytes:
        return None
    h = parse_head(rec[:ALIGN])
    if h is None or h.kid != kstr or h.nbytes != loc.nbytes or h.header.nbytes != h.nbytes:
        return None
    payload: memoryview | None = rec[ALIGN:ALIGN + h.nbytes]
    if h.sealed is not None:
        payload = unseal(h.sealed, rec[ALIGN:ALIGN + h.nbytes]) if unseal is not None else None
    if payload is None or checksum(payload) != h.header.checksum:
        return None
    try:
        key = parse_key(kstr)
    except ValueError:
        return None
    return Recovered(key, h.header, loc, h.tenant, h.sealed)


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
