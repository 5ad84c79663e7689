"""How a descriptor list becomes data frames (tcp): both sides compute the same plan from the descs.

Owns: `plan_frames()`.  Large ranges are cut into frames of at most ``frame_bytes`` that map to one
contiguous range each (sent zero-copy, received with ``recv_into`` straight into the destination);
ranges under ``small_bytes`` are coalesced into shared frames of up to ``frame_bytes`` (gathered by
the sender, scattered by the receiver through a preallocated staging buffer).
Must not touch: sockets.
"""

from __future__ import annotations

from typing import NamedTuple

FRAME_BYTES = 1 << 20
SMALL_BYTES = 64 << 10


class Piece(NamedTuple):
    desc: int    # index into the descriptor list
    offset: int  # offset inside that descriptor's range
    length: int


def plan_frames(lengths: list[int], frame_bytes: int = FRAME_BYTES, small_bytes: int = SMALL_BYTES) -> list[list[Piece]]:
    """Frames, each a list of pieces; a frame with one piece maps to one contiguous range."""
    if frame_bytes <= 0 or small_bytes <= 0:
        raise ValueError(f"frame_bytes and small_bytes must be > 0, got {frame_bytes}, {small_bytes}")
    if len(lengths) == 1 and 0 < lengths[0] <= frame_bytes:  # the common case, what the loop below gives
        return [[Piece(0, 0, lengths[0])]]
    frames: list[list[Piece]] = []
    batch: list[Piece] = []
    batch_bytes = 0
    for i, n in enumerate(lengths):
        if n == 0:
            continue
        if n < small_bytes:
            if batch_bytes + n > frame_bytes:
                frames.append(batch)
                batch, batch_bytes = [], 0
            batch.append(Piece(i, 0, n))
            batch_bytes += n
            continue
        for off in range(0, n, frame_bytes):
            frames.append([Piece(i, off, min(frame_bytes, n - off))])
    if batch:
        frames.append(batch)
    return frames


def frame_bytes_of(frame: list[Piece]) -> int:
    return sum(p.length for p in frame)
