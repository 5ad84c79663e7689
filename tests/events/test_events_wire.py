"""The wire format is vLLM's: byte-identical to what vLLM's own classes encode, and each side decodes the
other's; a malformed message is a WireError naming the frame."""

import msgspec
import pytest

from kvrelay.events import wire as w

kv_events = pytest.importorskip("vllm.distributed.kv_events", reason="vllm is not installed")


def _ours() -> w.KVEventBatch:
    return w.make_batch([
        w.stored([11, 12], 10, list(range(8)), 4, w.MEDIUM_CPU_TIER1),
        w.BlockRemoved(block_hashes=[11], medium=w.MEDIUM_DISK),
        w.AllBlocksCleared(),
    ], dp_rank=0, ts=123.5)


def _vllms(medium: str = w.MEDIUM_CPU_TIER1):
    return kv_events.KVEventBatch(ts=123.5, events=[
        kv_events.BlockStored(block_hashes=[11, 12], parent_block_hash=10, token_ids=list(range(8)), block_size=4,
                              lora_id=None, medium=medium, lora_name=None),
        kv_events.BlockRemoved(block_hashes=[11], medium=w.MEDIUM_DISK),
        kv_events.AllBlocksCleared(),
    ], data_parallel_rank=0)


def test_bytes_equal_vllms_and_decode_both_ways():
    ours = w.encode_batch(_ours())
    theirs = msgspec.msgpack.encode(_vllms())
    assert ours == theirs
    assert msgspec.msgpack.encode(_vllms(medium="GPU")) != ours  # negative control: one field differs
    back = msgspec.msgpack.Decoder(kv_events.KVEventBatch).decode(ours)
    assert back == _vllms()
    assert w.decode_batch(theirs) == _ours()


def test_vllm_bytes_hashes_and_extra_fields_decode():
    ev = kv_events.BlockStored(block_hashes=[b"\x01" * 32], parent_block_hash=None, token_ids=[1, 2], block_size=2,
                               lora_id=None, medium="GPU", lora_name=None, group_idx=0, session_id="s")
    got = w.decode_batch(msgspec.msgpack.encode(kv_events.KVEventBatch(ts=1.0, events=[ev])))
    assert got.events[0].block_hashes == [b"\x01" * 32] and got.events[0].session_id == "s"


def test_frames_round_trip_and_errors_name_the_frame():
    frames = w.encode_frames("kv", 7, _ours())
    assert frames[1] == (7).to_bytes(8, "big")
    assert w.decode_frames(frames) == ("kv", 7, _ours())
    with pytest.raises(w.WireError, match="2 frames"):
        w.decode_frames(frames[:2])
    with pytest.raises(w.WireError, match="sequence frame is 4 bytes"):
        w.decode_frames([frames[0], b"\0\0\0\1", frames[2]])
    with pytest.raises(w.WireError, match="does not decode"):
        w.decode_frames([frames[0], frames[1], b"\x93garbage"])
