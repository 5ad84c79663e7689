"""Chunk header round trip and checksum, hash-chain keys, KVTransferParams validation."""

import msgspec
import pytest
import torch

from kvrelay.keys import ChunkKey, block_hashes
from kvrelay.params import KVTransferParams
from kvrelay.transfer.wire import ChunkHeader, checksum, decode_header, encode_header, verify


def _header(payload) -> ChunkHeader:
    return ChunkHeader(compat_hash="abc", layer=3, token_start=16, token_end=48, head_start=0, head_end=2,
                       dtype="bfloat16", nbytes=len(payload), checksum=checksum(payload))


def test_header_round_trip_and_verify():
    payload = torch.randint(0, 255, (4096,), dtype=torch.uint8)
    h = _header(bytes(payload.numpy()))
    assert decode_header(encode_header(h)) == h
    verify(h, payload)
    flipped = payload.clone()
    flipped[1234] ^= 1
    with pytest.raises(ValueError, match="checksum mismatch"):
        verify(h, flipped)
    with pytest.raises(ValueError, match="payload is 4095 bytes, header says 4096"):
        verify(h, payload[:4095])


def test_header_rejects_garbage_and_other_versions():
    with pytest.raises(ValueError, match="malformed chunk header"):
        decode_header(b"\x93garbage")
    other = msgspec.structs.replace(_header(b"x"), version=99)
    with pytest.raises(ValueError, match="wire version 99 is not supported"):
        decode_header(encode_header(other))


def test_hash_chain_is_prefix_consistent():
    a = list(range(1000))
    b = a[:600] + [7] + a[601:]
    ha = block_hashes(a, 256, "m", "c")
    hb = block_hashes(b, 256, "m", "c")
    assert len(ha) == 4  # 3 full chunks and a partial one
    assert ha[:2] == hb[:2] and ha[2] != hb[2] and ha[3] != hb[3]  # a change poisons everything after it
    assert block_hashes(a[:512], 256, "m", "c") == ha[:2]
    assert block_hashes(a, 256, "other-model", "c")[0] != ha[0]
    assert block_hashes(a, 256, "m", "other-layout")[0] != ha[0]
    assert ChunkKey(ha[0], 1, 0, 2).encode() != ChunkKey(ha[0], 2, 0, 2).encode()


def test_params_round_trip_and_validation():
    hashes = block_hashes(list(range(300)), 256, "m", "c")
    p = KVTransferParams(request_id="r1", model_id="m", compat_hash="c", num_tokens=300, chunk_tokens=256,
                         block_hashes=hashes, num_layers=8, head_start=0, head_end=2,
                         store_address="tcp://127.0.0.1:5600", transport="shm", first_token=42)
    assert KVTransferParams.from_json(p.to_json()) == p
    assert KVTransferParams.from_dict(msgspec.json.decode(p.to_json())) == p
    with pytest.raises(ValueError, match="1 block hashes for 300 tokens"):
        KVTransferParams.from_dict({**msgspec.to_builtins(p), "block_hashes": hashes[:1]})
    with pytest.raises(ValueError, match="malformed kv_transfer_params"):
        KVTransferParams.from_json(b'{"request_id": 5}')
