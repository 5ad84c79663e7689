"""The KV-event wire format: vLLM's, byte for byte, so vLLM's and Dynamo's consumers read ours.

One ZeroMQ PUB message is three frames::

    topic (utf-8)  |  seq (8 bytes, big-endian, one per batch, from 0 per publisher epoch)  |  msgpack batch

and the batch is the array ``[ts, events, data_parallel_rank]``.  Each event is a msgspec struct tagged with
its class name (``"type": "BlockStored"`` in a map) whose fields come in the order of vLLM 0.32's own
classes in ``vllm.distributed.kv_events``; the defaults are omitted, as vLLM's encoder does.

Replay (vLLM's protocol, on a ROUTER socket): a client sends ``[b"", seq]`` (8 bytes big-endian: the first
seq it wants); the publisher answers one ``[b"", topic, seq, batch]`` per buffered batch with seq >= it,
then the end marker ``[b"", b"", END_SEQ, b""]``.  kvrelay extension: a request for ``SNAPSHOT_SEQ``
(0xFF * 8, which a vLLM publisher reads as "after everything" and answers with the end marker alone)
makes a kvrelay publisher that has a snapshot answer one batch ``[AllBlocksCleared, BlockStored ...]``
describing everything it holds, numbered with the last seq whose effect it includes, then the end marker.

Block hashes are unsigned 64-bit ints (vLLM's ``ExternalBlockHash`` with
``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``, the form Dynamo reads); decoding also accepts vLLM's bytes hashes.
Media: ``GPU`` (an engine's own paged cache, the reference engine's on CPU included: Dynamo's device
tier), ``CPU_TIER1`` (the store's host-memory pool) and ``DISK`` (the store's SSD tier).

Owns: the structs and encode/decode of frames.  Must not touch: sockets (publisher.py, subscriber.py).
"""

from __future__ import annotations

import time
from typing import Any, Union

import msgspec

MEDIUM_GPU = "GPU"
MEDIUM_CPU_TIER1 = "CPU_TIER1"
MEDIUM_DISK = "DISK"

SEQ_BYTES = 8
END_SEQ = (-1).to_bytes(SEQ_BYTES, "big", signed=True)  # vLLM's end-of-replay marker
SNAPSHOT_SEQ = END_SEQ  # kvrelay's snapshot request (see the module docstring)

BlockHash = Union[int, bytes]


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """Base of the three events (tagged by class name, as vLLM's are)."""


class BlockStored(KVCacheEvent):
    """``block_hashes`` (a chain) now hold ``token_ids``; ``parent_block_hash`` is the block before the first."""

    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None  # required (no default) in vLLM too: always on the wire, even as nil
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[BlockHash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


Event = Union[BlockStored, BlockRemoved, AllBlocksCleared]


class KVEventBatch(EventBatch):
    events: list[Event]


class WireError(ValueError):
    """A frame that is not a KV-event message (named: which frame, what was wrong)."""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(KVEventBatch)


def stored(hashes: list[int], parent: int | None, token_ids: list[int], block_size: int, medium: str,
           salt: str = "") -> BlockStored:
    """A `BlockStored` without LoRA (the only kind kvrelay publishes).  A tenant's ``salt`` (cache_salt) goes
    where vLLM puts it: in the extra keys of the prompt's first block (``parent`` None), since every later
    block's hash chains from it; a consumer that names blocks by their token ids (a router, Dynamo) must seed
    its chain with it, or one tenant's prompt would look held for another."""
    extra: list[tuple[Any, ...] | None] | None = None
    if salt and parent is None and hashes:
        extra = [(salt,)] + [None] * (len(hashes) - 1)
    return BlockStored(block_hashes=list(hashes), parent_block_hash=parent, token_ids=list(token_ids),
                       block_size=block_size, lora_id=None, medium=medium, lora_name=None, extra_keys=extra)


def salt_of(ev: BlockStored) -> str:
    """The cache_salt in a first block's extra keys ('' when none): its string entries other than the
    LoRA name (vLLM's order: LoRA name, multimodal (id, offset) pairs, the salt, embedding digests)."""
    if not ev.extra_keys or not ev.extra_keys[0]:
        return ""
    names = [k for k in ev.extra_keys[0] if isinstance(k, str) and k != ev.lora_name]
    return names[-1] if names else ""


def make_batch(events: list[Event], dp_rank: int | None = None, ts: float | None = None) -> KVEventBatch:
    return KVEventBatch(ts=time.time() if ts is None else ts, events=events, data_parallel_rank=dp_rank)


def encode_batch(batch: KVEventBatch) -> bytes:
    return _encoder.encode(batch)


def decode_batch(payload: bytes) -> KVEventBatch:
    try:
        return _decoder.decode(payload)
    except msgspec.DecodeError as e:
        raise WireError(f"KV-event batch ({len(payload)} bytes) does not decode: {e}") from None


def encode_seq(seq: int) -> bytes:
    return seq.to_bytes(SEQ_BYTES, "big")


def decode_seq(frame: bytes) -> int:
    if len(frame) != SEQ_BYTES:
        raise WireError(f"KV-event sequence frame is {len(frame)} bytes, expected {SEQ_BYTES}")
    return int.from_bytes(frame, "big")


def encode_frames(topic: str, seq: int, batch: KVEventBatch) -> list[bytes]:
    """The three PUB frames of one batch."""
    return [topic.encode(), encode_seq(seq), encode_batch(batch)]


def decode_frames(frames: list[bytes]) -> tuple[str, int, KVEventBatch]:
    """(topic, seq, batch) of a PUB message; `WireError` naming the problem otherwise."""
    if len(frames) != 3:
        raise WireError(f"KV-event message has {len(frames)} frames, expected 3 (topic, seq, batch)")
    try:
        topic = frames[0].decode()
    except UnicodeDecodeError:
        raise WireError(f"KV-event topic frame is not utf-8: {frames[0][:32]!r}") from None
    return topic, decode_seq(frames[1]), decode_batch(frames[2])
