"""Fuzzed control messages: random bytes and structurally plausible requests with wrong, extreme or missing
field values.  The daemon answers what it can, never crashes, keeps answering pings, and still serves
publishes and pulls afterwards."""

from __future__ import annotations

import time
import urllib.request

import msgspec
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings, strategies as st

from store_helpers import COMPAT, local_conn, local_reply, make_chunk
from kvrelay.store import protocol as P
from kvrelay.keys import ChunkKey
from kvrelay.store.client import StoreClient, StoreFullError
from kvrelay.store.local import FRAME
from kvrelay.transfer.wire import ChunkHeader

OPS = ["hello", "lookup", "reserve", "commit", "commit_many", "pull", "pull_many", "wait", "abort", "lease", "release",
       "delete", "purge", "stats", "ping", "nope", ""]
FIELDS = ["req_id", "version", "unpin", "keys", "key", "nbytes", "ttl", "timeout", "request_id", "header", "headers",
          "name", "compat_hash", "transport", "prefix", "namespace", "reason"]
leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2 ** 63), max_value=2 ** 64 - 1),
                 st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40), st.binary(max_size=40))
key = st.tuples(st.text(max_size=40), st.integers(-5, 2 ** 40), st.integers(-5, 70), st.integers(-5, 70)).map(list)
value = st.recursive(st.one_of(leaf, key), lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                                    st.dictionaries(st.text(max_size=10), inner,
                                                                                    max_size=4)), max_leaves=12)
request = st.builds(lambda op, fields: {"op": op, **fields}, st.sampled_from(OPS),
                    st.dictionaries(st.sampled_from(FIELDS), value, max_size=6))
# type-correct requests with extreme values reach past decoding into the store's logic
num = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10).map(float),
                st.floats(0, 0.2))
ckey = st.builds(ChunkKey, st.one_of(st.text(max_size=40), st.sampled_from(["", "0" * 32, "f" * 32])),
                 st.integers(-3, 2 ** 40), st.integers(-3, 70), st.integers(-3, 70))
keys = st.lists(ckey, max_size=4)
size = st.one_of(st.integers(-10, 10), st.integers(0, 2 ** 40), st.sampled_from([4096, 4 << 20, (4 << 20) + 1]))
header = st.builds(ChunkHeader, version=st.integers(0, 3), compat_hash=st.sampled_from([COMPAT, "", "other"]),
                   layer=st.integers(-2, 2 ** 33), token_start=st.integers(-2, 100), token_end=st.integers(-2, 100),
                   head_start=st.integers(-2, 9), head_end=st.integers(-2, 9), dtype=st.text(max_size=8),
                   nbytes=size, checksum=st.integers(0, 2 ** 64 - 1))
typed = st.one_of(
    st.builds(P.Hello, name=st.text(max_size=20), compat_hash=st.text(max_size=20),
              transport=st.sampled_from(["shm", "tcp", "nixl", "carrier-pigeon", ""])),
    st.builds(P.Lookup, keys=keys),
    st.builds(P.Reserve, request_id=st.text(max_size=10), keys=keys, nbytes=st.lists(size, max_size=4), ttl=num),
    st.builds(P.Commit, key=ckey, header=header),
    st.builds(P.CommitMany, keys=keys, headers=st.lists(header, max_size=4)),
    st.builds(P.Pull, key=ckey, timeout=num, request_id=st.text(max_size=5)),
    st.builds(P.PullMany, keys=keys, timeout=num, request_id=st.text(max_size=5)),
    st.builds(P.WaitReady, keys=keys, timeout=num),
    st.builds(P.Abort, request_id=st.text(max_size=5), reason=st.text(max_size=20)),
    st.builds(P.Lease, keys=keys, ttl=num),
    st.builds(P.Release, request_id=st.text(max_size=5), keys=keys),
    st.builds(P.Delete, keys=keys),
    st.builds(P.Purge, prefix=st.one_of(st.none(), st.text(max_size=3)), namespace=st.one_of(st.none(), st.text(max_size=8))),
    st.builds(P.Stats), st.builds(P.Ping, version=st.integers(-1, 3)))
typed_frames = st.tuples(typed, st.lists(st.integers(-5, 2 ** 40), max_size=3)).map(
    lambda t: [P.encode(msgspec.structs.replace(t[0], unpin=t[1]))])
frames = st.one_of(st.lists(st.binary(max_size=64), min_size=1, max_size=3),
                   request.map(lambda r: [msgspec.msgpack.encode(r)]), typed_frames)


@pytest.fixture(scope="module")
def sock(daemon):  # `daemon` (conftest) is module-scoped: this module's own
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(daemon.address)
    s.send(P.encode(P.Hello(req_id=1, name="fuzz", compat_hash=COMPAT, transport="shm")))
    assert s.poll(10_000) and P.decode_reply(s.recv()).ok  # a session: fuzzed requests reach the store's logic
    yield s
    s.close()
    ctx.term()


def _ping(s: zmq.Socket) -> None:
    """The daemon still answers (replies to earlier fuzz messages may come first)."""
    s.send(P.encode(P.Ping(req_id=424242)))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if s.poll(int((deadline - time.monotonic()) * 1000) + 1):
            rep = P.decode_reply(s.recv())
            if rep.req_id == 424242:
                assert rep.ok
                return
    raise AssertionError("the daemon stopped answering after fuzzed input")


@pytest.mark.slow  # 300 examples: minutes on a loaded 2-core machine
@pytest.mark.timeout(300)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(frames, min_size=1, max_size=8))
def test_fuzzed_messages_never_break_the_daemon(daemon, sock, batch):
    for f in batch:
        sock.send_multipart(f)
    _ping(sock)
    assert daemon.proc.poll() is None


def _local_ping(daemon) -> None:
    s = local_conn(daemon.address)
    try:
        msg = P.encode(P.Ping(req_id=424242))
        s.sendall(FRAME.pack(len(msg)) + msg)
        assert local_reply(s).req_id == 424242
    finally:
        s.close()


# On the same-host socket a message is a length-prefixed frame: fuzz the framing too (raw bytes, lengths
# that lie, frames cut short) as well as the messages inside well-formed frames.
local_piece = st.one_of(st.binary(max_size=64),
                        frames.map(lambda f: b"".join(FRAME.pack(len(x)) + x for x in f)),
                        st.tuples(st.integers(0, 2 ** 32 - 1), st.binary(max_size=16)).map(
                            lambda t: FRAME.pack(t[0]) + t[1]))


@pytest.mark.timeout(300)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(local_piece, min_size=1, max_size=6), hello=st.booleans())
def test_fuzzed_bytes_on_the_local_socket_never_break_the_daemon(daemon, pieces, hello):
    s = local_conn(daemon.address)
    try:
        if hello:  # a session, so fuzzed requests reach the store's logic
            msg = P.encode(P.Hello(req_id=1, name="fuzz", compat_hash=COMPAT))
            s.sendall(FRAME.pack(len(msg)) + msg)
        for p in pieces:
            try:
                s.sendall(p)
            except OSError:  # the daemon closed it (a frame over the limit): that is its answer
                break
    finally:
        s.close()
    _local_ping(daemon)
    assert daemon.proc.poll() is None


@pytest.mark.timeout(60)
def test_daemon_serves_normally_after_the_fuzz(daemon):
    # runs after the fuzz (same module daemon): health, stats, and a publish + pull
    base = f"http://127.0.0.1:{daemon.info['metrics_port']}"
    assert urllib.request.urlopen(base + "/healthz", timeout=5).status == 200
    k, h, d = make_chunk(9901, 4096)
    with StoreClient(daemon.address, compat_hash=COMPAT) as c:
        assert c.stats()["bad_requests"] > 0  # the fuzz was answered with errors, not ignored
        log = (daemon.tmp / "daemon.log").read_text()
        assert "internal error" not in log, log[-3000:]  # every bad input met a clear error, not a bug
        try:
            c.publish(k, h, d)
        except StoreFullError:  # fuzzed reservations may hold the pool until they expire: a clear refusal
            return
        out = torch.empty(4096, dtype=torch.uint8)
        assert c.pull(k, out, time.monotonic() + 5) == h and torch.equal(out, d)
