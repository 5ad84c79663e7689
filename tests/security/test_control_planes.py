"""CURVE on the control planes: a store daemon started with --keys serves only clients with the cluster's
keys (a real publish and pull over ZMQ, the tcp transport's handshake and its authenticated data plane);
a client with no key, another cluster's keys, or only the server's public key is refused and counted."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from kvrelay import security
from kvrelay.store.client import StoreClient, StoreError
from store_helpers import COMPAT, Daemon, make_chunk, wait_for


@pytest.fixture(scope="module")
def keyed_daemon(tmp_path_factory, keys_dir):
    d = Daemon(tmp_path_factory.mktemp("store"), pool_size="64MiB", max_chunk_bytes="8MiB", transports="shm,tcp",
               keys=str(keys_dir))
    try:
        yield d.start()
    finally:
        d.cleanup()


def refused(daemon: Daemon, plane: str) -> float:
    text = urllib.request.urlopen(f"{daemon.metrics_url}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("kvrelay_auth_refused_total{") and f'plane="{plane}"' in line)


@pytest.mark.timeout(120)
def test_keyed_client_publishes_and_pulls_over_curve_and_the_tcp_data_plane(keyed_daemon, keys):
    with security.using(keys):
        publisher = StoreClient(keyed_daemon.address, compat_hash=COMPAT, transport="tcp", control="zmq")
        puller = StoreClient(keyed_daemon.address, compat_hash=COMPAT, transport="tcp", control="zmq")
    with publisher, puller:
        k, h, d = make_chunk(11, 3 << 20)
        publisher.publish(k, h, d)
        out = torch.zeros(h.nbytes, dtype=torch.uint8)
        assert puller.pull(k, out, time.monotonic() + 20) == h
        assert torch.equal(out, d)
        _, _, other = make_chunk(12, 3 << 20)
        assert not torch.equal(out, other)  # negative control: the comparison can fail
    assert refused(keyed_daemon, "store") == 0 and refused(keyed_daemon, "tcp-data") == 0


def _refused_client(daemon: Daemon, keys: security.Keys | None) -> str:
    t0 = time.monotonic()
    with security.using(keys), pytest.raises(StoreError) as err:
        StoreClient(daemon.address, compat_hash=COMPAT, control="zmq", timeout=20)
    assert time.monotonic() - t0 < 15, "a refused handshake must fail at once, not at the timeout"
    return str(err.value)


@pytest.mark.timeout(120)
def test_no_key_and_wrong_keys_are_refused_and_counted(keyed_daemon, other_keys, keys):
    before = refused(keyed_daemon, "store")
    msg = _refused_client(keyed_daemon, None)
    assert "--keys" in msg, msg
    wait_for(lambda: refused(keyed_daemon, "store") > before, 10, "the no-key refusal counted")
    before = refused(keyed_daemon, "store")
    _refused_client(keyed_daemon, other_keys)
    wait_for(lambda: refused(keyed_daemon, "store") > before, 10, "the wrong-key refusal counted")
    # knows the server's public key (it is not secret) but has its own client keypair: ZAP refuses it
    intruder = dataclasses.replace(other_keys, server_public=keys.server_public)
    text = urllib.request.urlopen(f"{keyed_daemon.metrics_url}/metrics", timeout=10).read().decode()
    zap_before = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if "not in the key directory" in line)
    _refused_client(keyed_daemon, intruder)

    def zap_refusals() -> float:
        text = urllib.request.urlopen(f"{keyed_daemon.metrics_url}/metrics", timeout=10).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if "not in the key directory" in line)
    wait_for(lambda: zap_refusals() > zap_before, 10, "the ZAP refusal counted")
    # the daemon still serves the cluster's clients
    with security.using(keys), StoreClient(keyed_daemon.address, compat_hash=COMPAT, control="zmq") as c:
        c.ping()
    log = (keyed_daemon.tmp / "daemon.log").read_text()
    assert "refused a peer on the store plane" in log and "--keys DIR" in log


@pytest.mark.timeout(120)
def test_keyed_client_of_a_daemon_without_keys_fails_clearly(tmp_path, keys):
    plain = Daemon(tmp_path, pool_size="16MiB", max_chunk_bytes="4MiB").start()
    try:
        msg = _refused_client(plain, keys)
        assert "--keys" in msg, msg
    finally:
        plain.cleanup()


@pytest.mark.timeout(120)
@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another user")
def test_local_socket_refuses_another_user(keyed_daemon, keys):
    with security.using(keys), StoreClient(keyed_daemon.address, compat_hash=COMPAT) as c:
        name = c.info["local"]
        c.ping()  # negative control: this user's requests over the same-host socket are served
    assert name
    code = (f"import os, socket; from kvrelay.store.local import to_sockaddr; os.setuid(65534); "
            f"s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(to_sockaddr({name!r})); "
            f"print(repr(s.recv(1)))")
    before = refused(keyed_daemon, "store")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == "b''", out.stdout + out.stderr  # closed at once
    wait_for(lambda: refused(keyed_daemon, "store") > before, 10, "the other user's connection counted")
