"""vLLM engines in the cluster file: ``engine: vllm`` cluster-wide or per host, each server bound to its host's
address with the checkpoint the file names; the router's host follows its own vLLM servers' KV events over
ipc://; bad files (no checkpoint, a block size vLLM's CPU attention refuses, a missing directory) are refused
naming the field.  No process is started here."""

from __future__ import annotations

import pytest
import yaml

from kvrelay import cluster as C
from kvrelay import clusterplan as CP
from kvrelay.hostplan import VllmSpec

TWO_HOSTS = """
transport: tcp
keys: KEYS
engine: vllm
model: {checkpoint: CKPT}
hosts:
  a:
    address: 198.18.7.1
    store: {port: 5601}
    prefill: [{port: 8101}]
    router: {port: 8001}
  b:
    address: 198.18.7.2
    decode: [{}, {port: 8300, block_size: 64}]
"""


def spec_of(text: str, ckpt: str, keys: str = "") -> C.ClusterSpec:
    return C.parse(yaml.safe_load(text.replace("CKPT", ckpt).replace("KEYS", keys)), "c.yaml")


@pytest.fixture
def ckpt(tmp_path):
    d = tmp_path / "kvrelay-llama"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def test_vllm_hosts_plan(tmp_path, ckpt):
    from kvrelay.security import write_keys
    spec = spec_of(TWO_HOSTS, str(ckpt), str(write_keys(tmp_path / "keys")))
    a = CP.plan(spec, spec.hosts["a"], "pool-x", tmp_path)
    launches = dict(a.processes)
    prefill = launches["prefill0"]
    assert isinstance(prefill, VllmSpec)
    assert (prefill.host, prefill.port, prefill.block_size, prefill.transport) == ("198.18.7.1", 8101, 32, "shm")
    assert prefill.checkpoint == str(ckpt) and prefill.name == "kvrelay-llama" and prefill.connector
    assert prefill.kv_events == f"ipc://{tmp_path.resolve()}/prefill0.kv"
    router = launches["router"]
    assert isinstance(router, list)
    assert router[router.index("--events") + 1] == \
        f"http://198.18.7.1:8101=ipc://{tmp_path.resolve()}/prefill0.kv,ipc://{tmp_path.resolve()}/prefill0.kv.replay"
    assert router.count("--events") == 1  # host b's servers: a unix socket does not reach the router's host
    b = CP.plan(spec, spec.hosts["b"], "pool-y", tmp_path)
    d0, d1 = (launch for _, launch in b.processes)
    assert isinstance(d0, VllmSpec) and isinstance(d1, VllmSpec)
    assert (d0.host, d0.port, d0.block_size, d0.transport, d0.kv_events) == ("198.18.7.2", 8200, 32, "tcp", None)
    assert (d1.port, d1.block_size) == (8300, 64) and b.remote_store


def test_engine_per_host_and_its_checkpoint(tmp_path, ckpt):
    text = """
hosts:
  a: {address: 127.0.0.1, store: {}, router: {}, prefill: [{}], engine: vllm, checkpoint: CKPT}
  b: {address: 127.0.0.2, decode: [{}]}
"""
    spec = spec_of(text, str(ckpt))
    assert spec.hosts["a"].engine == "vllm" and spec.hosts["a"].checkpoint == str(ckpt)
    assert spec.hosts["b"].engine == "reference"
    plan = CP.plan(spec, spec.hosts["b"], "pool", tmp_path)
    assert plan.processes[0][1][0] == "engine" and plan.processes[0][1][1:3] == ["--role", "decode"]


@pytest.mark.parametrize("text, words", [
    ("engine: vllm\nhosts: {a: {address: 127.0.0.1, store: {}, router: {}, decode: [{}]}}",
     "c.yaml: hosts.a.engine: vllm needs a checkpoint directory"),
    ("engine: sglang\nhosts: {a: {address: 127.0.0.1, store: {}, router: {}, decode: [{}]}}",
     "c.yaml: engine: 'sglang' is not one of reference, vllm"),
    ("engine: vllm\nmodel: {checkpoint: /m}\nhosts: {a: {address: 127.0.0.1, store: {}, router: {}, "
     "decode: [{block_size: 48}]}}", "c.yaml: hosts.a.decode[0].block_size: 48 is not a multiple of 32"),
    ("hosts: {a: {address: 127.0.0.1, store: {}, router: {}, decode: [{}], engine: vllm, checkpoint: 5}}",
     "c.yaml: hosts.a.checkpoint: 5 is not a directory path"),
])
def test_bad_vllm_files_name_the_field(text, words):
    with pytest.raises(C.ClusterError) as err:
        C.parse(yaml.safe_load(text), "c.yaml")
    assert words in str(err.value)


def test_missing_checkpoint_on_this_host(tmp_path):
    text = "engine: vllm\nmodel: {checkpoint: CKPT}\nhosts: {a: {address: 127.0.0.1, store: {}, router: {}, " \
           "decode: [{}]}}"
    spec = spec_of(text, str(tmp_path / "absent"))
    with pytest.raises(C.ClusterError, match=r"model.checkpoint: .*absent is not a checkpoint directory .*on this host"):
        CP.plan(spec, spec.hosts["a"], "pool", tmp_path)
