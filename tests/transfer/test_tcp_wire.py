"""Fast unit tests of the tcp data sockets' pieces: the encrypted chunk plan and its associated data, the
chunk ciphers (nonces never reused, directions and connections keyed apart, tampering refused before
anything reaches the caller's buffer), and the scatter-gather bookkeeping."""

from __future__ import annotations

import socket

import pytest

from kvrelay.security.dataplane import SEAL_BYTES, TO_CLIENT, TO_SERVER, ChunkOpener, ChunkSealer
from kvrelay.transfer.tcp_wire import advance, recv_exact, seal_plan, send_all


def test_seal_plan_covers_each_range_in_order_with_its_address():
    plan = seal_plan([(1, 100, 10), (2, 0, 0), (3, 5, 25)], xid=42, chunk=10)
    assert [(i, pos, k) for i, pos, k, _ in plan] == [(0, 0, 10), (2, 0, 10), (2, 10, 10), (2, 20, 5)]
    ads = [ad for *_, ad in plan]
    assert len(set(ads)) == len(ads)  # every chunk is bound to its own address
    assert seal_plan([(3, 5, 25)], xid=43, chunk=10)[0][3] != ads[1]  # and to its transfer


def test_nonces_never_repeat_and_directions_are_keyed_apart():
    key = b"k" * 32
    sealer = ChunkSealer(key, TO_SERVER)
    nonces = [sealer.next_nonce() for _ in range(20000)]
    assert len(set(nonces)) == len(nonces) and all(len(n) == 12 for n in nonces)
    back = ChunkSealer(key, TO_CLIENT)
    assert not set(nonces[:100]) & {back.next_nonce() for _ in range(100)}
    # the same counter in the two directions encrypts under different keys too
    out_a, out_b = bytearray(16 + SEAL_BYTES), bytearray(16 + SEAL_BYTES)
    ChunkSealer(key, TO_SERVER).seal_into(memoryview(b"x" * 16), b"ad", memoryview(out_a))
    ChunkSealer(key, TO_CLIENT).seal_into(memoryview(b"x" * 16), b"ad", memoryview(out_b))
    assert out_a != out_b
    # another connection (another session key) with the same counter
    out_c = bytearray(16 + SEAL_BYTES)
    ChunkSealer(b"j" * 32, TO_SERVER).seal_into(memoryview(b"x" * 16), b"ad", memoryview(out_c))
    assert out_c != out_a


def _sealed(sealer: ChunkSealer, data: bytes, ad: bytes) -> bytearray:
    out = bytearray(len(data) + SEAL_BYTES)
    sealer.seal_into(memoryview(data), ad, memoryview(out))
    return out


def test_chunks_open_in_order_and_tampering_is_refused():
    key = b"s" * 32
    sealer, opener = ChunkSealer(key, TO_CLIENT), ChunkOpener(key, TO_CLIENT)
    first, second = _sealed(sealer, b"a" * 64, b"ad1"), _sealed(sealer, b"b" * 64, b"ad2")
    out = bytearray(64)
    assert opener.open_into(memoryview(first), b"ad1", memoryview(out)) and out == b"a" * 64
    assert not ChunkOpener(key, TO_CLIENT).open_into(memoryview(second), b"ad2", memoryview(out))  # out of order
    assert not opener.open_into(memoryview(second), b"ad1", memoryview(out))  # another address
    opener = ChunkOpener(key, TO_CLIENT)
    first[3] ^= 1
    assert not opener.open_into(memoryview(first), b"ad1", memoryview(out))
    assert not ChunkOpener(key, TO_SERVER).open_into(memoryview(second), b"ad2", memoryview(out))  # other direction


@pytest.mark.parametrize("n", [0, 1, 5, 11, 30])
def test_advance(n):
    bufs = [memoryview(b"abcde"), memoryview(b""), memoryview(b"fghijk"), memoryview(b"lmn")]
    rest = b"".join(bytes(b) for b in advance(bufs, n))
    assert rest == b"abcdefghijklmn"[n:]


def test_send_all_and_recv_exact_scatter_gather():
    a, b = socket.socketpair()
    with a, b:
        parts = [memoryview(bytes([i]) * (i * 100)) for i in range(1, 40)]
        send_all(a, parts)
        got = bytearray(sum(p.nbytes for p in parts))
        assert recv_exact(b, memoryview(got))
        assert got == b"".join(bytes(p) for p in parts)
        a.close()
        assert not recv_exact(b, memoryview(bytearray(1)))
