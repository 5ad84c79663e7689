"""The membership flags of `kvrelay router` and `kvrelay engine`: good values accepted, bad ones refused with
one line naming the flag (exit 2, no traceback); and the router's pools taking members in and out."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvrelay.router.config import RouterConfig
from kvrelay.router.pool import Pool


def test_router_config_with_etcd_needs_no_decode_url():
    config = RouterConfig(decode=(), etcd="http://127.0.0.1:2379", cluster="c-1")
    assert config.etcd == "http://127.0.0.1:2379"
    with pytest.raises(ValueError, match="at least one --decode URL is needed \\(or --etcd URL"):
        RouterConfig(decode=())
    with pytest.raises(ValueError, match="--etcd '127.0.0.1:2379': the scheme must be http://"):
        RouterConfig(decode=(), etcd="127.0.0.1:2379")
    with pytest.raises(ValueError, match="--cluster 'a/b'"):
        RouterConfig(decode=(), etcd="http://127.0.0.1:2379", cluster="a/b")


def test_pool_add_and_remove_at_run_time():
    pool = Pool("decode", ["http://127.0.0.1:1"])
    w = pool.add("http://127.0.0.1:2/")
    assert pool.add("http://127.0.0.1:2") is w and w.healthy
    assert [x.url for x in pool.workers] == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert pool.remove("http://127.0.0.1:2") and not pool.remove("http://127.0.0.1:2")
    assert [x.url for x in pool.workers] == ["http://127.0.0.1:1"]


@pytest.mark.parametrize("args, message", [
    (["router", "--etcd", "http://127.0.0.1"], "--etcd 'http://127.0.0.1': no port"),
    (["engine", "--port", "0", "--etcd", "http://127.0.0.1:2379"],
     "--etcd registers a prefill or decode engine; this one is --role colocated"),
    (["engine", "--role", "decode", "--store", "tcp://127.0.0.1:1", "--etcd", "http://127.0.0.1:2379",
      "--name", "a b"], "member name 'a b'"),
    (["engine", "--role", "decode", "--store", "tcp://127.0.0.1:1", "--etcd", "http://127.0.0.1:2379",
      "--etcd-ttl", "1"], "--etcd-ttl 1: give at least 2 seconds"),
])
def test_bad_membership_flags(args, message):
    out = subprocess.run([sys.executable, "-m", "kvrelay.cli", *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_bad_store_membership_flags():
    out = subprocess.run([sys.executable, "-m", "kvrelay.cli", "store", "--port", "0", "--etcd", "http://127.0.0.1:1",
                          "--cluster", "no/slash"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--cluster 'no/slash'" in out.stderr and "Traceback" not in out.stderr, out.stderr
