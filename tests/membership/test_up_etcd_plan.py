"""`kvrelay up -f cluster.yaml` with `etcd:`: the stores and reference engines register (named HOST-NAME), the
router follows etcd instead of a fixed list of them; a file may then leave decode engines to join at run
time; a bad etcd, a plain http:// one off loopback, or an https:// one without keys is refused naming the
field.  Plans only: no process starts here
(test_router_membership.py runs engines and a router on a real etcd)."""

import pytest
import yaml

from kvrelay import cluster as C
from kvrelay import clusterplan as CP

FILE = """
transport: shm
etcd: http://127.0.0.1:2379
hosts:
  a: {address: 127.0.0.1, store: {}, prefill: [{}], decode: [{}], router: {}}
"""


def _flag(argv: list, flag: str) -> list[str]:
    return [str(argv[i + 1]) for i, a in enumerate(argv) if a == flag]


def test_processes_register_and_the_router_follows_etcd(tmp_path):
    spec = C.parse(yaml.safe_load(FILE), "c.yaml")
    assert spec.etcd == "http://127.0.0.1:2379"
    procs = dict(CP.plan(spec, spec.hosts["a"], "pool", tmp_path).processes)
    assert set(procs) == {"store", "prefill0", "decode0", "router"}
    for name in ("store", "prefill0", "decode0"):
        assert _flag(procs[name], "--etcd") == ["http://127.0.0.1:2379"]
        assert _flag(procs[name], "--name") == [f"a-{name}"]
    router = procs["router"]
    assert _flag(router, "--etcd") == ["http://127.0.0.1:2379"]
    assert _flag(router, "--prefill") == [] and _flag(router, "--decode") == []  # they come from etcd
    without = dict(CP.plan(C.parse(yaml.safe_load(FILE.replace("etcd:", "#")), "c.yaml"), spec.hosts["a"], "pool",
                          tmp_path).processes)
    assert "--etcd" not in without["router"] and _flag(without["router"], "--decode") == ["http://127.0.0.1:8200"]


def test_with_etcd_decodes_may_join_at_run_time():
    text = FILE.replace("decode: [{}], ", "")
    assert not C.parse(yaml.safe_load(text), "c.yaml").urls("decode")
    with pytest.raises(C.ClusterError, match=r"no decode engine: .*\(or `etcd:`"):
        C.parse(yaml.safe_load(text.replace("etcd:", "#")), "c.yaml")


@pytest.mark.parametrize("value, why", [
    ("127.0.0.1:2379", "c.yaml: etcd: the scheme must be http://"),
    ("https://127.0.0.1:2379", r"c.yaml: etcd: 'https://127.0.0.1:2379': an https:// etcd .* set `keys: DIR`"),
    ("http://198.18.0.1:2379", "c.yaml: etcd: plain http:// to 198.18.0.1 is not on loopback"),
])
def test_bad_etcd_is_refused_naming_the_field(value, why):
    with pytest.raises(C.ClusterError, match=why):
        C.parse(yaml.safe_load(FILE.replace("http://127.0.0.1:2379", value)), "c.yaml")


def test_https_etcd_with_keys_registers_everything_there(tmp_path):
    from kvrelay.security import write_keys
    from kvrelay.security.etcdcerts import write_etcd_certs
    keys = write_keys(tmp_path / "keys")
    text = FILE.replace("http://127.0.0.1:2379", "https://198.18.0.1:2379")
    with pytest.raises(C.ClusterError, match=r"no etcd certificates .* `kvrelay keys .* --etcd-host"):
        C.parse(yaml.safe_load(text + f"keys: {keys}\n"), "c.yaml")
    write_etcd_certs(keys, ["198.18.0.1"])
    spec = C.parse(yaml.safe_load(text + f"keys: {keys}\n"), "c.yaml")
    procs = dict(CP.plan(spec, spec.hosts["a"], "pool", tmp_path).processes)
    assert all(_flag(procs[n], "--etcd") == ["https://198.18.0.1:2379"] for n in ("store", "prefill0", "router"))
