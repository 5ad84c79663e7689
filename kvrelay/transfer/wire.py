"""The chunk wire format: one layer's KV for one request's token range (and head range).

Owns: `ChunkHeader` (msgspec, versioned) and the payload checksum.  Must not touch: how chunks are
moved (transports) or where they are stored (store).  The payload is the canonical byte order
``[kv, tokens, heads, head_dim]`` described in kernels/layout.py.

Wire versions:
  1  first version: header fields below, xxh3-64 checksum of the payload.
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


def checksum(payload) -> int:
    """xxh3-64 of a buffer (bytes, memoryview, numpy array or contiguous CPU tensor viewed as bytes)."""
    return xxhash.xxh3_64_intdigest(_as_buffer(payload))


def verify(header: ChunkHeader, payload) -> None:
    """Raise ValueError if ``payload`` does not match the header's length and checksum."""
    buf = _as_buffer(payload)
    if buf.nbytes != header.nbytes:
        raise ValueError(f"chunk layer {header.layer} tokens [{header.token_start}, {header.token_end}): "
                         f"payload is {buf.nbytes} bytes, header says {header.nbytes}")
    got = xxhash.xxh3_64_intdigest(buf)
    if got != header.checksum:
        raise ValueError(f"chunk layer {header.layer} tokens [{header.token_start}, {header.token_end}): "
                         f"checksum mismatch (expected {header.checksum:#018x}, got {got:#018x})")


def _as_buffer(payload) -> memoryview:
    torch = sys.modules.get("torch")  # a tensor can only exist if torch is imported: never import it here
    if torch is not None and isinstance(payload, torch.Tensor):
        if payload.device.type != "cpu":
            raise ValueError(f"checksum needs a CPU buffer, got a tensor on {payload.device}")
        if not payload.is_contiguous():
            raise ValueError("checksum needs a contiguous tensor")
        payload = payload.view(torch.uint8).numpy() if payload.numel() else b""
    mv = memoryview(payload)
    return mv.cast("B") if mv.ndim != 1 or mv.format != "B" else mv
