"""An aborted request releases what it held at once, on the vLLM path (issue 26): a kvrelay store, a prefill
and a decode vLLM server (KVRelayConnector, kv_both) and `kvrelay router` in front, one cluster for the
module.  After each kind of abort the store's pins and reserved bytes are back at their earlier values
within a second (of the servers having let the requests go), and the servers hold no request and no KV
blocks: a client that disconnects during the prefill (the issue's six 1,800-token streams closed after
0.15 s), one that disconnects after its first token, and a decode leg vLLM aborts while it loads.  With the
release left to the pin's lease (30 s) or the pull's deadline (30 s), each test fails."""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.request
import uuid

import pytest

from kvrelay import proc
from kvrelay.promtext import sum_samples

from holdings import store_held
from vllm_helpers import pd_servers, prompt, require_vllm
from waiting import wait_until

pytestmark = pytest.mark.slow

RELEASED_WITHIN_S = 1.0  # the store's pins and reserved bytes, once the servers let the requests go
IDLE_WITHIN_S = 20.0  # the servers let aborted requests go (2 shared cores: a prefill step may be running)


@pytest.fixture(scope="module")
def cluster(llama_ckpt, tmp_path_factory):
    require_vllm()
    logs = tmp_path_factory.mktemp("vllm-abort")
    with pd_servers(llama_ckpt, logs, "shm") as (store, servers):
        P, D = servers["P"], servers["D"]
        router = proc.spawn_kvrelay(["router", "--port", "0", "--prefill", P.url, "--decode", D.url], name="router",
                                    ready_file=logs / "router.json", log=logs / "router.log", log_mode="ab")
        try:
            url = router.wait_ready(60)["url"]
            wait_until(lambda: _ready(url), 60, "the router seeing both workers healthy", interval=0.1)
            yield store, P, D, url
        finally:
            router.stop(15)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def _store_aborts(store) -> int:
    from kvrelay.store.client import StoreClient
    with StoreClient(store.address, transport="shm", compat_hash="stats-only", name="abort-stats") as c:
        return int(c.stats()["aborts"])


def _idle(server) -> bool:
    m = server.metrics()
    return (sum_samples(m, "vllm:num_requests_running") == 0 and sum_samples(m, "vllm:num_requests_waiting") == 0
            and sum_samples(m, "vllm:kv_cache_usage_perc") == 0)


def _released(store, before: tuple[int, int], *servers) -> None:
    """Every server lets its requests go, and then the store holds what it held before, within a second."""
    wait_until(lambda: all(_idle(s) for s in servers), IDLE_WITHIN_S,
               "the vLLM servers hold no request and no KV block", interval=0.05)
    wait_until(lambda: store_held(store) == before, RELEASED_WITHIN_S,
               f"store pins and reserved bytes back to {before} (now {store_held(store)})", interval=0.05)


class Stream:
    """A streaming completion sent over its own connection, which `hang_up` closes as a client that gives
    up does (the TCP connection itself: a response object reading it must not keep it open)."""

    def __init__(self, url: str, ids: list[int], max_tokens: int, **extra) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=120)
        body = {"model": "m", "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True, **extra}
        self.conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        self.sock = self.conn.sock
        assert self.sock is not None

    def hang_up(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.conn.close()
        self.sock.close()


def test_client_disconnect_after_the_first_token_releases_at_once(cluster):
    """First in the file: on the old code the pins its decode leaves behind are the ones measured, not a
    previous test's.  The decode's load is over when the client leaves: what its pulls pinned went back
    then, not with the decode's next store request (none here) or at the pin's expiry."""
    store, P, D, url = cluster
    before = store_held(store)
    stream = Stream(url, prompt(1800, seed=2610), 400)
    resp = stream.conn.getresponse()
    assert resp.status == 200
    while not resp.readline().startswith(b"data: "):  # the first token's event
        pass
    stream.hang_up()
    _released(store, before, P, D)


def test_client_disconnect_during_the_prefill_releases_at_once(cluster):
    """The issue's run: six streams of 1,800 tokens through the router, each closed by its client 0.15 s
    after it was sent (while the prefill leg runs): the router cancels both legs, the engines abort them."""
    store, P, D, url = cluster
    before = store_held(store)
    streams = [Stream(url, prompt(1800, seed=2600 + i), 64) for i in range(6)]
    time.sleep(0.15)  # the scenario itself: the client gives up 0.15 s after sending (not a wait for a condition)
    for s in streams:
        s.hang_up()
    _released(store, before, P, D)


def test_decode_aborted_by_vllm_while_it_loads_releases_at_once(cluster):
    """A decode leg whose prefill never comes, closed while its pull waits in the store: vLLM aborts it,
    the connector ends the wait at once (the store counts the abort) and vLLM frees its blocks then, not
    at the 30 s pull deadline."""
    store, P, D, url = cluster
    before, aborts0 = store_held(store), _store_aborts(store)
    rid = f"never-prefilled-{uuid.uuid4().hex[:8]}"
    stream = Stream(D.url, prompt(900, seed=2620), 8,
                    kv_transfer_params={"do_remote_prefill": True, "kvrelay_request_id": rid})
    wait_until(lambda: sum_samples(D.metrics(), "vllm:kv_cache_usage_perc") > 0, 60,
               "the decode's blocks allocated for its load", interval=0.05)
    stream.hang_up()
    _released(store, before, D)
    assert _store_aborts(store) == aborts0 + 1
