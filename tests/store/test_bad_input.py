"""Bad input gets a clear error and the daemon keeps serving, with nothing already stored lost."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import msgspec
import pytest
import torch
import zmq

from store_helpers import COMPAT, make_chunk, metric, wait_for
from kvrelay.store import protocol as P
from kvrelay.store.client import StoreClient, StoreError
from kvrelay.store.config import StoreConfig


def raw_call(address: str, frames: list[bytes], timeout: float = 5.0) -> P.Reply:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    try:
        s.connect(address)
        s.send_multipart(frames)
        assert s.poll(int(timeout * 1000)), "the daemon did not answer a malformed message"
        return P.decode_reply(s.recv())
    finally:
        s.close()
        ctx.term()


@pytest.mark.timeout(60)
def test_malformed_messages_are_answered_and_nothing_is_lost(daemon):
    k, h, d = make_chunk(700, 10_000)
    with StoreClient(daemon.address, compat_hash=COMPAT) as c:
        c.publish(k, h, d)
        for frames in ([b"\x00garbage\xff"], [b""], [msgspec.msgpack.encode({"op": "nope"})],
                       [msgspec.msgpack.encode({"op": "pull", "key": "x", "timeout": 1})], [b"a", b"b"]):
            rep = raw_call(daemon.address, frames)
            assert not rep.ok and rep.code == "bad_request" and rep.error
        rep = raw_call(daemon.address, [P.encode(P.Ping(version=99))])
        assert rep.code == "version" and "99" in rep.error
        out = torch.empty(10_000, dtype=torch.uint8)
        assert c.pull(k, out, time.monotonic() + 2) == h and torch.equal(out, d)


@pytest.mark.timeout(60)
def test_oversize_wrong_checksum_wrong_compat(daemon_factory):
    daemon = daemon_factory(pool_size="64MiB", max_chunk_bytes="8MiB", verify_commits="all")
    with StoreClient(daemon.address, compat_hash=COMPAT) as c:
        k, h, d = make_chunk(701, 4096)
        with pytest.raises(StoreError, match="max_chunk_bytes") as ei:
            c.reserve("big", [(k, 9 << 20)])
        assert ei.value.code == "bad_request"
        with pytest.raises(StoreError, match="1..max_chunk_bytes"):
            c.reserve("zero", [(k, 0)])
        c.reserve("r", [(k, h.nbytes)])
        buf = c.publish_buffer(k)
        buf.copy_(d)
        buf[17] ^= 1  # the slot does not match the header's checksum
        with pytest.raises(StoreError, match="checksum mismatch") as ei:
            c.commit(k, h)
        assert ei.value.code == "corrupt"
        assert c.lookup([k]) == 0
        c.reserve("r", [(k, h.nbytes)])
        c.publish_buffer(k).copy_(d)
        bad = msgspec.structs.replace(h, compat_hash="other-model")
        with pytest.raises(StoreError, match="compat hash"):
            c.commit(k, bad)
        c.reserve("r", [(k, h.nbytes)])
        c.publish_buffer(k).copy_(d)
        c.publish_buffer(k)[0] ^= 1
        c.commit(k, h, wait=False)  # pipelined: the failure surfaces at flush()
        with pytest.raises(StoreError, match="earlier Commit.*checksum mismatch"):
            c.flush()
        c.flush()  # nothing pending any more
        c.reserve("r", [(k, h.nbytes)])
        c.publish_buffer(k).copy_(d)
        c.commit(k, h, wait=False)  # the honest retry works
        c.flush()
        with pytest.raises(ValueError, match="uint8"):
            c.pull(k, torch.empty(4096, dtype=torch.float32), time.monotonic() + 1)
        with pytest.raises(ValueError, match="out has"):
            c.pull(k, torch.empty(100, dtype=torch.uint8), time.monotonic() + 1)
        with pytest.raises(StoreError, match="ttl"):
            c.lease([k], ttl=-1)
        c.ping()
        assert c.stats()["pins"] == 0  # the refused pull gave its pin back


@pytest.mark.timeout(60)
def test_unverified_same_host_commit_is_caught_by_puller_and_spiller(daemon_factory, tmp_path):
    """Default verify_commits=remote: a same-host commit is not re-hashed, but a slot that does not match its
    checksum is refused by every puller ("corrupt") and dropped by the spiller before it reaches the SSD."""
    def publish(c):
        (k, h, d), (k2, h2, d2) = make_chunk(801, 3 << 20), make_chunk(802, 4096)
        c.reserve("r", [(k, h.nbytes), (k2, h2.nbytes)])
        buf = c.publish_buffer(k)
        buf.copy_(d)
        buf[(2 << 20) + 5] ^= 1
        c.commit(k, h)  # accepted: nobody re-hashed it
        c.publish_buffer(k2).copy_(d2)
        c.commit(k2, h2)
        return k, h, k2, h2, d2

    memory_only = daemon_factory(pool_size="64MiB", max_chunk_bytes="8MiB")
    with StoreClient(memory_only.address, compat_hash=COMPAT) as c:
        k, h, k2, h2, d2 = publish(c)
        with pytest.raises(StoreError, match="checksum mismatch") as ei:
            c.pull(k, torch.empty(h.nbytes, dtype=torch.uint8), time.monotonic() + 2)
        assert ei.value.code == "corrupt"
    with_ssd = daemon_factory(pool_size="64MiB", max_chunk_bytes="8MiB", ssd_dir=tmp_path / "ssd",
                              ssd_size="256MiB", ssd_segment_size="32MiB")
    with StoreClient(with_ssd.address, compat_hash=COMPAT) as c:
        k, h, k2, h2, d2 = publish(c)
        wait_for(lambda: (s := c.stats())["checksum_failures"] >= 1 and s["ssd_chunks"] >= 1, 20,
                 "the bad chunk refused and the good one spilled")
        s = c.stats()
        assert s["checksum_failures"] == 1 and s["ssd_chunks"] == 1  # only the good chunk was spilled
        assert c.lookup([k]) == 0 and c.lookup([k2]) == 1
        out = torch.empty(h2.nbytes, dtype=torch.uint8)
        assert c.pull(k2, out, time.monotonic() + 2) == h2 and torch.equal(out, d2)


@pytest.mark.timeout(30)
def test_health_ready_metrics(daemon):
    base = f"http://127.0.0.1:{daemon.info['metrics_port']}"
    assert urllib.request.urlopen(base + "/healthz", timeout=5).status == 200
    assert urllib.request.urlopen(base + "/readyz", timeout=5).status == 200
    text = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
    for name in ("kvrelay_store_bytes", "kvrelay_store_request_hit_rate", "kvrelay_store_token_hit_rate",
                 "kvrelay_store_pull_latency_seconds_bucket", "kvrelay_store_evictions_total",
                 "kvrelay_store_admission_refusals_total", "kvrelay_store_lease_expiries_total",
                 "kvrelay_store_aborts_total", "kvrelay_store_ssd_promotions_total", "kvrelay_store_ssd_gbps"):
        assert name in text, name
    assert metric(text, "kvrelay_store_pool_bytes") == 64 << 20
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(base + "/nope", timeout=5)


def test_unreachable_daemon_is_a_clear_error():
    """Nothing listening: refused at once (not after the 30 s timeout); something listening that never
    answers: the timeout, named."""
    import socket
    t0 = time.monotonic()
    with pytest.raises(StoreError, match="nothing accepts connections") as ei:
        StoreClient("tcp://127.0.0.1:9", compat_hash=COMPAT, timeout=30)
    assert ei.value.code == "unreachable" and time.monotonic() - t0 < 15
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        with pytest.raises(StoreError, match="did not answer"):
            StoreClient(f"tcp://127.0.0.1:{silent.getsockname()[1]}", compat_hash=COMPAT, timeout=0.5)
    with pytest.raises(ValueError, match="tcp://"):
        StoreClient("127.0.0.1:9", compat_hash=COMPAT)


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="loopback"):
        StoreConfig(host="0.0.0.0")
    with pytest.raises(ValueError, match="cannot parse size"):
        StoreConfig(pool_size="lots")
    with pytest.raises(ValueError, match="multiple of 4096"):
        StoreConfig(pool_size=5000)
    with pytest.raises(ValueError, match="transports"):
        StoreConfig(transports="shm,carrier-pigeon")
    y = tmp_path / "store.yaml"
    y.write_text("pool_size: 2GiB\nssd_dir: /tmp/x\ntransports: [shm, tcp]\n")
    cfg = StoreConfig.from_sources(str(y), env={"KVRELAY_STORE_PORT": "7000", "KVRELAY_STORE_CHUNK_TTL": "5"},
                                   overrides={"port": 7001})
    assert cfg.pool_size == 2 << 30 and cfg.port == 7001 and cfg.chunk_ttl == 5.0 and cfg.transports == ["shm", "tcp"]
    y.write_text("pool_sise: 1\n")
    with pytest.raises(ValueError, match="unknown store options"):
        StoreConfig.from_sources(str(y), env={})
    with pytest.raises(ValueError, match="KVRELAY_STORE_BOGUS"):
        StoreConfig.from_sources(None, env={"KVRELAY_STORE_BOGUS": "1"})
