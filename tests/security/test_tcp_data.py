"""The tcp data plane with keys: a connection proves the shared secret before it is served, and every
request header carries a MAC of that connection's session.  Wrong secret, no handshake, forged or
replayed requests are refused and counted; the right secret moves bytes exactly (and so does CURVE)."""

from __future__ import annotations

import dataclasses

import msgspec
import numpy as np
import pytest
import zmq

from kvrelay import security
from kvrelay.security import metrics
from kvrelay.security.dataplane import TAGGED
from kvrelay.transfer import create_transport
from kvrelay.transfer.base import Desc, XferState
from kvrelay.transfer.tcp_server import DataRep, DataReq

MIB = 1 << 20


@pytest.fixture
def pair(keys):
    made = []

    def make(server_keys, client_keys, encrypt: bool = False):
        with security.using(server_keys):
            srv = create_transport("tcp", f"srv{len(made)}", "compat", encrypt=encrypt)
        made.append(srv)
        with security.using(client_keys):
            cli = create_transport("tcp", f"cli{len(made)}", "compat")
        made.append(cli)
        region, view = srv.alloc(4 * MIB)
        src = np.frombuffer(view, np.uint8)
        src[:] = np.random.default_rng(len(made)).integers(0, 256, src.size, dtype=np.uint8)
        local, lview = cli.alloc(4 * MIB)
        return srv, cli, region.region_id, src, local.region_id, np.frombuffer(lview, np.uint8)

    yield make
    for t in made:
        t.close()
        assert t.open_handles() == 0


def _read(cli, peer, local, remote, n=4 * MIB):
    h = cli.read(peer, [Desc(local, 0, remote, 0, n)], timeout=20)
    state = h.wait(20)
    error = h.error
    h.release()
    return state, error


def test_right_secret_reads_and_writes_byte_exact(pair, keys):
    srv, cli, remote, src, local, dst = pair(keys, keys)
    assert srv.info().meta.endswith(b"#hmac")
    peer = cli.connect(srv.address, timeout=20)
    for _ in range(3):  # several requests on one session: sequence numbers advance
        assert _read(cli, peer, local, remote) == (XferState.DONE, None)
    assert np.array_equal(dst, src)
    dst[: MIB] = 42
    h = cli.write(peer, [Desc(local, 0, remote, MIB, MIB)], timeout=20)
    assert h.wait(20) is XferState.DONE
    h.release()
    assert (src[MIB:2 * MIB] == 42).all() and not (src[:MIB] == 42).all()


def test_wrong_secret_is_refused_and_counted(pair, keys):
    wrong = dataclasses.replace(keys, secret=b"\x01" * 32)  # the right CURVE keys, another shared secret
    srv, cli, remote, src, local, dst = pair(keys, wrong)
    peer = cli.connect(srv.address, timeout=20)  # the control plane (CURVE) lets it in
    before = metrics.total("tcp-data")
    state, error = _read(cli, peer, local, remote)
    assert state is XferState.FAILED and "shared secret" in error, error
    assert metrics.total("tcp-data") > before
    assert not np.array_equal(dst, src)  # nothing arrived


def test_requests_without_a_session_or_with_a_bad_mac_are_refused(pair, keys):
    srv, cli, remote, src, local, dst = pair(keys, keys)
    address = srv.info().meta.decode().partition("#")[0]
    enc = msgspec.msgpack.Encoder()
    dec = msgspec.msgpack.Decoder(DataRep)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = 10_000
    try:
        sock.connect(address)
        before = metrics.total("tcp-data")
        sock.send(enc.encode(DataReq("read", 1, [(remote, 0, 4096)])))  # no handshake at all
        frames = sock.recv_multipart()
        assert len(frames) == 1 and "authentication required" in dec.decode(frames[0]).error
        # a handshake with a wrong proof
        sock.send(enc.encode(DataReq("hello", 0, [], nonce=b"n" * 16)))
        assert dec.decode(sock.recv()).proof
        sock.send(enc.encode(DataReq("proof", 0, [], nonce=b"p" * 32)))
        assert "wrong handshake proof" in dec.decode(sock.recv()).error
        sock.send(TAGGED + b"t" * 32 + enc.encode(DataReq("read", 2, [(remote, 0, 4096)], seq=1)))  # forged MAC
        frames = sock.recv_multipart()
        assert len(frames) == 1 and "authentication required" in dec.decode(frames[0]).error
        assert metrics.total("tcp-data") >= before + 3
    finally:
        sock.close()
        ctx.term()
    # a replayed request: the real client's session, one request sent twice
    peer = cli.connect(srv.address, timeout=20)
    assert _read(cli, peer, local, remote, 4096) == (XferState.DONE, None)
    sock_, session = next(iter(cli._client_sessions.items()))
    head = enc.encode(DataReq("read", 99, [(remote, 0, 4096)], seq=session.seq))  # a sequence number already used
    before = metrics.total("tcp-data")
    sock_.send(TAGGED + session.tag(head) + head)
    assert sock_.poll(10_000)
    frames = sock_.recv_multipart()
    assert "replayed" in dec.decode(frames[0]).error
    assert metrics.total("tcp-data") == before + 1


def test_plaintext_client_of_a_keyed_server_fails_clearly(pair, keys):
    srv, cli, remote, src, local, dst = pair(keys, None)
    with pytest.raises(Exception, match="--keys"):
        cli.connect(srv.address, timeout=5)


def test_encrypted_data_plane_byte_exact(pair, keys):
    srv, cli, remote, src, local, dst = pair(keys, keys, encrypt=True)
    assert srv.info().meta.endswith(b"#curve")
    peer = cli.connect(srv.address, timeout=20)
    assert _read(cli, peer, local, remote) == (XferState.DONE, None)
    assert np.array_equal(dst, src)
