"""The tcp transport's plain data sockets with keys: a socket that did not bind to a handshake session, a
request with a forged MAC or a replayed sequence number, and (encrypted) a tampered or misplaced chunk are
each refused with an error naming the problem, and nothing of their payload is written."""

from __future__ import annotations

import socket

import msgspec
import numpy as np
import pytest

from kvrelay import security
from kvrelay.security import metrics
from kvrelay.security.dataplane import SEAL_BYTES
from kvrelay.transfer import create_transport
from kvrelay.transfer.base import Desc, XferState
from kvrelay.transfer.tcp_server import DataReq
from kvrelay.transfer.tcp_wire import BIND, BIND_MAGIC, REP, REQ, recv_exact, seal_plan

KIB = 1 << 10
enc = msgspec.msgpack.Encoder()


@pytest.fixture
def pair(keys):
    made = []

    def make(encrypt: bool = False):
        with security.using(keys):
            srv = create_transport("tcp", f"srv{len(made)}", "compat", encrypt=encrypt)
            cli = create_transport("tcp", f"cli{len(made)}", "compat")
        made.extend([srv, cli])
        region, view = srv.alloc(256 * KIB)
        remote = np.frombuffer(view, np.uint8)
        remote[:] = 5
        peer = cli.connect(srv.address, timeout=20)
        return srv, cli, peer, region.region_id, remote

    yield make
    for t in made:
        t.close()
        assert t.open_handles() == 0


def _reply(sock: socket.socket) -> tuple[int, str]:
    head = bytearray(REP.size)
    assert recv_exact(sock, memoryview(head)), "closed without a reply"
    xid, n = REP.unpack(head)
    err = bytearray(n)
    assert recv_exact(sock, memoryview(err))
    return xid, err.decode()


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(10)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _request(head: bytes, tag: bytes) -> bytes:
    return REQ.pack(len(head), len(tag)) + tag + head


def _bound_socket(srv, cli, peer):
    """A data socket of the client's own, bound to a fresh session (as the client opens them), for sending by hand."""
    dc = cli._tcp._open_conn(cli._peers[peer.name])
    dc.sock.settimeout(10)
    return dc


def test_data_port_without_a_handshake_is_refused_and_nothing_written(pair):
    srv, cli, peer, remote_rid, remote = pair()
    before = metrics.total("tcp-data")
    with socket.create_connection(("127.0.0.1", srv._tcp._sock_port), timeout=10) as s:
        head = enc.encode(DataReq("write", 1, [(remote_rid, 0, 4 * KIB)], seq=1))
        s.sendall(_request(head, b"") + b"\x01" * 4 * KIB)  # a write request straight away: no bind message
        xid, error = _reply(s)
        assert "authentication required" in error and "bind" in error, error
        assert _closed(s)
    with socket.create_connection(("127.0.0.1", srv._tcp._sock_port), timeout=10) as s:
        s.sendall(BIND.pack(BIND_MAGIC, 16, 32) + b"s" * 16 + b"t" * 32)  # a made-up session
        assert "did not complete the handshake" in _reply(s)[1]
        assert _closed(s)
    assert (remote == 5).all()
    assert metrics.total("tcp-data") >= before + 2


def test_forged_mac_is_refused_and_nothing_written(pair):
    srv, cli, peer, remote_rid, remote = pair()
    dc = _bound_socket(srv, cli, peer)
    head = enc.encode(DataReq("write", 7, [(remote_rid, 0, 4 * KIB)], seq=dc.session.next_seq()))
    before = metrics.total("tcp-data")
    dc.sock.sendall(_request(head, b"f" * 32) + b"\x02" * 4 * KIB)
    xid, error = _reply(dc.sock)
    assert xid == 7 and "wrong MAC" in error, error
    assert _closed(dc.sock)
    assert (remote == 5).all()
    assert metrics.total("tcp-data") == before + 1


def test_replayed_sequence_number_is_refused_and_nothing_written(pair):
    srv, cli, peer, remote_rid, remote = pair()
    dc = _bound_socket(srv, cli, peer)
    head = enc.encode(DataReq("write", 8, [(remote_rid, 0, 4 * KIB)], seq=dc.session.next_seq()))
    request = _request(head, dc.session.tag(head))
    dc.sock.sendall(request + b"\x03" * 4 * KIB)
    assert _reply(dc.sock) == (8, "")
    assert (remote[:4 * KIB] == 3).all()
    dc.sock.sendall(request + b"\x04" * 4 * KIB)  # the same request, its MAC valid, sent again
    xid, error = _reply(dc.sock)
    assert xid == 8 and "replayed" in error and "sequence 1 after 1" in error, error
    assert _closed(dc.sock)
    assert (remote[:4 * KIB] == 3).all() and (remote[4 * KIB:] == 5).all()


@pytest.mark.parametrize("how", ["flipped bit", "another address"])
def test_encrypted_tampered_chunk_is_refused_and_not_written(pair, how):
    srv, cli, peer, remote_rid, remote = pair(encrypt=True)
    dc = _bound_socket(srv, cli, peer)
    assert dc.sealer is not None
    ranges = [(remote_rid, 0, 4 * KIB)]
    head = enc.encode(DataReq("write", 9, ranges, seq=dc.session.next_seq()))
    ((_, _, n, ad),) = seal_plan(ranges, 9)
    if how == "another address":  # sealed for offset 4 KiB, sent for offset 0
        ad = seal_plan([(remote_rid, 4 * KIB, 4 * KIB)], 9)[0][3]
    sealed = bytearray(n + SEAL_BYTES)
    dc.sealer.seal_into(memoryview(b"\x06" * n), ad, memoryview(sealed))
    if how == "flipped bit":
        sealed[100] ^= 1
    dc.sock.sendall(_request(head, dc.session.tag(head)) + sealed)
    xid, error = _reply(dc.sock)
    assert xid == 9 and "does not authenticate" in error and "nothing of it was written" in error, error
    assert _closed(dc.sock)
    assert (remote == 5).all()


def test_encrypted_transfers_byte_exact_with_many_chunks(pair):
    srv, cli, peer, remote_rid, remote = pair(encrypt=True)
    remote[:] = np.random.default_rng(3).integers(0, 256, remote.size, dtype=np.uint8)
    region, view = cli.alloc(256 * KIB)
    local = np.frombuffer(view, np.uint8)
    descs = [Desc(region.region_id, 0, remote_rid, 100, 200 * KIB), Desc(region.region_id, 210 * KIB, remote_rid, 7, 13)]
    with cli.read(peer, descs, timeout=20) as h:
        h.result()
    assert np.array_equal(local[:200 * KIB], remote[100:100 + 200 * KIB])
    assert np.array_equal(local[210 * KIB:210 * KIB + 13], remote[7:20])
    local[:] = 9
    with cli.write(peer, [Desc(region.region_id, 0, remote_rid, 0, 256 * KIB)], timeout=20) as h:
        assert h.wait(20) is XferState.DONE
    assert (remote == 9).all()
