"""The control plane's two links (the same-host Unix socket and ZMQ) and pipelined commits (CommitMany)."""

from __future__ import annotations

import time

import msgspec
import pytest
import torch

from store_helpers import COMPAT, local_conn, local_reply, make_chunk
from kvrelay.store import control
from kvrelay.store import protocol as P
from kvrelay.store.client import StoreClient, StoreError
from kvrelay.store.local import FRAME, MAX_FRAME


@pytest.mark.timeout(60)
def test_same_host_clients_use_the_local_socket_and_both_links_interoperate(daemon):
    with StoreClient(daemon.address, compat_hash=COMPAT) as local, \
            StoreClient(daemon.address, compat_hash=COMPAT, control="zmq") as remote:
        assert local.info["local"].startswith("@kvrelay-store-")
        assert local._sock().kind == "local" and remote._sock().kind == "zmq"
        k, h, d = make_chunk(3001, 200_000)
        local.publish(k, h, d)
        out = torch.empty(h.nbytes, dtype=torch.uint8)
        assert remote.pull(k, out, time.monotonic() + 5) == h and torch.equal(out, d)
        k2, h2, d2 = make_chunk(3002, 4096)
        remote.publish(k2, h2, d2)
        out2 = torch.empty(h2.nbytes, dtype=torch.uint8)
        assert local.pull(k2, out2, time.monotonic() + 5) == h2 and torch.equal(out2, d2)
    with pytest.raises(ValueError, match="control"):
        StoreClient(daemon.address, compat_hash=COMPAT, control="udp")


@pytest.mark.timeout(60)
def test_bad_frames_on_the_local_socket(daemon):
    """Garbage is answered like on the ZMQ socket; a frame claiming more than MAX_FRAME bytes closes that
    connection (nothing is allocated for it); a request before hello is refused; the daemon serves on."""
    s = local_conn(daemon.address, timeout=5)
    try:
        s.sendall(FRAME.pack(5) + b"\xc1junk")
        rep = local_reply(s)
        assert not rep.ok and rep.code == "bad_request" and rep.req_id == -1
        msg = P.encode(P.Lookup(req_id=7, keys=[]))
        s.sendall(FRAME.pack(len(msg)) + msg[:3])  # a frame in two pieces
        time.sleep(0.05)
        s.sendall(msg[3:])
        rep = local_reply(s)
        assert rep.req_id == 7 and rep.code == "session"  # no hello on this connection yet
        s.sendall(FRAME.pack(MAX_FRAME + 1))
        assert s.recv(65536) == b""  # closed by the daemon
    finally:
        s.close()
    with StoreClient(daemon.address, compat_hash=COMPAT) as c:
        c.ping()
        k, h, d = make_chunk(3003, 4096)
        c.publish(k, h, d)
        assert c.lookup([k]) == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ctl", ["auto", "zmq"])
def test_pipelined_commits_go_as_one_message_each_judged_alone(daemon, ctl):
    base = 3100 if ctl == "auto" else 3150  # the daemon is shared: fresh chunks for each case
    with StoreClient(daemon.address, compat_hash=COMPAT, control=ctl) as c:
        chunks = [make_chunk(base + i, 4096) for i in range(3)]
        c.reserve("batch", [(k, h.nbytes) for k, h, _ in chunks])
        for i, (k, h, d) in enumerate(chunks):
            c.publish_buffer(k).copy_(d)
            bad = msgspec.structs.replace(h, compat_hash="another-model") if i == 1 else h
            c.commit(k, bad, wait=False)
        assert c._queued_commits() == 3  # nothing sent yet
        with pytest.raises(StoreError, match=r"earlier Commit.*compat hash.*\(1 of 3 refused; the rest committed\)"):
            c.flush()
        assert [c.lookup([k]) for k, _, _ in chunks] == [1, 0, 1]  # the refusal undid nothing else
        c.flush()  # nothing pending any more

        # queued commits go before this thread's next request: a lookup right after sees them
        k, h, d = make_chunk(base + 10, 4096)
        c.reserve("order", [(k, h.nbytes)])
        c.publish(k, h, d, wait=False)
        assert c.lookup([k]) == 1


@pytest.mark.timeout(60)
def test_a_full_batch_is_sent_without_flush(daemon, monkeypatch):
    """COMMIT_BATCH queued commits leave at once: another client sees them while the publisher has not
    flushed (and has made no other request)."""
    monkeypatch.setattr(control, "COMMIT_BATCH", 2)
    with StoreClient(daemon.address, compat_hash=COMPAT) as pub, StoreClient(daemon.address, compat_hash=COMPAT) as sub:
        chunks = [make_chunk(3200 + i, 4096) for i in range(3)]
        pub.reserve("full", [(k, h.nbytes) for k, h, _ in chunks])
        for k, h, d in chunks:
            pub.publish(k, h, d, wait=False)
        assert pub._queued_commits() == 1  # the first two left as one message
        out = torch.empty(4096, dtype=torch.uint8)
        for k, h, d in chunks[:2]:
            assert sub.pull(k, out, time.monotonic() + 5) == h and torch.equal(out, d)
        assert sub.lookup([chunks[2][0]]) == 0
        pub.flush()
        assert sub.lookup([chunks[2][0]]) == 1


@pytest.mark.timeout(60)
def test_a_daemon_without_the_local_socket_serves_over_zmq(daemon_factory):
    d = daemon_factory(pool_size="16MiB", no_local_socket=True)
    with StoreClient(d.address, compat_hash=COMPAT) as c:
        assert c.info["local"] == "" and c._sock().kind == "zmq"
        k, h, data = make_chunk(3300, 4096)
        c.publish(k, h, data)
        out = torch.empty(4096, dtype=torch.uint8)
        assert c.pull(k, out, time.monotonic() + 5) == h and torch.equal(out, data)


@pytest.mark.timeout(60)
def test_an_unreachable_local_socket_falls_back_to_zmq(daemon):
    """A thread whose local connect fails (e.g. the client reached the daemon's TCP port from another
    network namespace) talks ZMQ instead, and keeps working."""
    with StoreClient(daemon.address, compat_hash=COMPAT) as c:
        c._drop_link(c._sock())
        c.info = {**c.info, "local": "@kvrelay-store-no-such-daemon"}
        c.ping()
        assert c._sock().kind == "zmq"
        k, h, d = make_chunk(3400, 4096)
        c.publish(k, h, d)
        assert c.lookup([k]) == 1


@pytest.mark.timeout(60)
def test_close_sends_commits_that_no_thread_flushed(daemon):
    import threading
    chunks = [make_chunk(3500 + i, 4096) for i in range(3)]
    c = StoreClient(daemon.address, compat_hash=COMPAT)
    c.reserve("unflushed", [(k, h.nbytes) for k, h, _ in chunks])

    def publisher() -> None:  # queues its commits and ends without flush()
        for k, h, d in chunks:
            c.publish(k, h, d, wait=False)
    t = threading.Thread(target=publisher)
    t.start()
    t.join()
    assert c._queued_commits(all_threads=True) == 3
    c.close()
    with StoreClient(daemon.address, compat_hash=COMPAT) as other:
        assert other.lookup([k for k, _, _ in chunks]) == 3
