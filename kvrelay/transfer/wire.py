"""The chunk wire format: one layer's KV for one request's token range (and head range).

Owns: `ChunkHeader` (msgspec, versioned) and the payload checksum (computed by the native library,
csrc/chunksum.c, in parallel and fused with copies; `checksum_reference` is the same definition in
Python).  Must not touch: how chunks are
moved (transports) or where they are stored (store).  The payload is the canonical byte order
``[kv, tokens, heads, head_dim]`` described in kernels/layout.py.

Wire versions:
  1  first version: header fields below, xxh3-64 checksum of the payload.
  2  the checksum is an xxh3-64 tree over 64 KiB leaves (`checksum_reference`), so it can be computed
     by several threads and right behind the copy that moves the bytes (one pass over memory).
"""

from __future__ import annotations

import sys

import msgspec
import xxhash

from kvrelay.versions import WIRE_VERSION


class ChunkHeader(msgspec.Struct, frozen=True, kw_only=True):
    version: int = WIRE_VERSION
    compat_hash: str
    layer: int
    token_start: int
    token_end: int
    head_start: int
    head_end: int
    dtype: str
    nbytes: int
    checksum: int

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start

    @property
    def num_heads(self) -> int:
        return self.head_end - self.head_start


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ChunkHeader)


def encode_header(header: ChunkHeader) -> bytes:
    return _encoder.encode(header)


def decode_header(data: bytes) -> ChunkHeader:
    """Decode and check the version; raises ValueError on malformed input or another wire version."""
    try:
        header = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"malformed chunk header: {exc}") from None
    if header.version != WIRE_VERSION:
        raise ValueError(f"chunk wire version {header.version} is not supported (this side speaks {WIRE_VERSION})")
    return header


LEAF_BYTES = 64 << 10  # must equal KS_LEAF in csrc/chunksum.h

try:
    from kvrelay import _native
except ImportError:  # not built: the pure-Python definition (slower, same values)
    _native = None  # type: ignore[assignment]  # the name is typed as the module; None: not built


def checksum_reference(payload) -> int:
    """The chunk checksum in Python: up to LEAF_BYTES, xxh3-64 of the bytes; above, xxh3-64 seeded with the
    length, of the little-endian xxh3-64 of each LEAF_BYTES leaf (the last one shorter)."""
    buf = _as_buffer(payload)
    n = buf.nbytes
    if n <= LEAF_BYTES:
        return xxhash.xxh3_64_intdigest(buf)
    leaves = b"".join(xxhash.xxh3_64_intdigest(buf[o:o + LEAF_BYTES]).to_bytes(8, "little")
                      for o in range(0, n, LEAF_BYTES))
    return xxhash.xxh3_64_intdigest(leaves, seed=n)


def checksum(payload) -> int:
    """The chunk checksum of a buffer (bytes, memoryview, numpy array or contiguous CPU tensor viewed as
    bytes); leaves hash in parallel on the native pool, without the GIL."""
    buf = _as_buffer(payload)
    return _native.checksum(buf) if _native is not None else checksum_reference(buf)


def copy_into(dst, src, with_checksum: bool = True, stream: bool = False) -> int | None:
    """Copy ``src`` into ``dst`` (same size, not overlapping) on the native pool, without the GIL; with
    ``with_checksum``, return the checksum of the bytes copied (each leaf is hashed just before its copy:
    one read from memory, not two).  ``stream``: non-temporal stores, for a destination nobody reads soon
    (a store pool slot: about 2x a thread's copy rate here); not for a buffer that is read next."""
    if _native is not None and type(dst) is type(src) and _is_plain_cpu_tensor(dst) and _is_plain_cpu_tensor(src):
        n = dst.numel() * dst.element_size()  # the fast path: raw addresses (saves ~13 us of buffer conversions)
        if n != src.numel() * src.element_size():
            raise ValueError(f"copy_into: destination has {n} bytes, source {src.numel() * src.element_size()}")
        return _native.copy_addr(dst.data_ptr(), src.data_ptr(), n, with_checksum, stream)
    d, s = _as_buffer(dst, writable=True), _as_buffer(src)
    if d.nbytes != s.nbytes:
        raise ValueError(f"copy_into: destination has {d.nbytes} bytes, source {s.nbytes}")
    if _native is not None:
        return _native.copy_into(d, s, with_checksum, stream)
    d[:] = s
    return checksum_reference(d) if with_checksum else None


def verify(header: ChunkHeader, payload) -> None:
    """Raise ValueError if ``payload`` does not match the header's length and checksum."""
    buf = _as_buffer(payload)
    if buf.nbytes != header.nbytes:
        raise ValueError(f"chunk layer {header.layer} tokens [{header.token_start}, {header.token_end}): "
                         f"payload is {buf.nbytes} bytes, header says {header.nbytes}")
    got = checksum(buf)
    if got != header.checksum:
        raise ValueError(f"chunk layer {header.layer} tokens [{header.token_start}, {header.token_end}): "
                         f"checksum mismatch (expected {header.checksum:#018x}, got {got:#018x})")


def _is_plain_cpu_tensor(t) -> bool:
    torch = sys.modules.get("torch")
    return (torch is not None and isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.is_contiguous()
            and not t.requires_grad)


def _as_buffer(payload, writable: bool = False) -> memoryview:
    torch = sys.modules.get("torch")  # a tensor can only exist if torch is imported: never import it here
    if torch is not None and isinstance(payload, torch.Tensor):
        if payload.device.type != "cpu":
            raise ValueError(f"checksum needs a CPU buffer, got a tensor on {payload.device}")
        if not payload.is_contiguous():
            raise ValueError("checksum needs a contiguous tensor")
        payload = payload.view(torch.uint8).numpy() if payload.numel() else bytearray()
    mv = memoryview(payload)
    if writable and mv.readonly:
        raise ValueError("the destination buffer is read-only")
    return mv.cast("B") if mv.ndim != 1 or mv.format != "B" else mv
