"""The cluster file of `kvrelay up -f`: validation names the file and the field, the per-host plan runs
what the file says with the addresses it says, and `kvrelay up -f` refuses a bad file in one line, exit 2."""

import subprocess
import sys
import textwrap

import pytest
import yaml

from kvrelay import cluster as C
from kvrelay import clusterplan as CP

TWO_HOSTS = """
transport: tcp
keys: KEYS
env: {UCX_LOG_LEVEL: error}
hosts:
  a:
    address: 198.18.7.1
    store: {port: 5601, pool_size: 256MiB}
    prefill: [{port: 8101}]
    router: {port: 8001}
  b:
    address: 198.18.7.2
    env: {OMP_NUM_THREADS: 1}
    decode: [{}, {port: 8300, block_size: 64}]
"""


def spec_of(text: str, keys: str = "/nonexistent") -> C.ClusterSpec:
    return C.parse(yaml.safe_load(text.replace("KEYS", keys)), "c.yaml")


def key_dir(tmp_path):
    try:
        from kvrelay.security import write_keys
    except ImportError:  # no authentication in this build: the plan checks only that the directory is there
        (tmp_path / "keys").mkdir()
        return tmp_path / "keys"
    return write_keys(tmp_path / "keys")


def test_two_hosts_plan(tmp_path):
    keys = key_dir(tmp_path)
    spec = spec_of(TWO_HOSTS, str(keys))
    assert spec.store_address == "tcp://198.18.7.1:5601"
    assert spec.urls("decode") == ["http://198.18.7.2:8200", "http://198.18.7.2:8300"]
    a = CP.plan(spec, spec.hosts["a"], "pool-x", tmp_path)
    names = [n for n, _ in a.processes]
    assert names == ["store", "prefill0", "router"] and not a.remote_store
    store, prefill, router = (argv for _, argv in a.processes)
    assert store[:7] == ["store", "--host", "198.18.7.1", "--port", "5601", "--metrics-port", "0"]
    assert "shm,tcp" in store and "256MiB" in store
    assert prefill[prefill.index("--transport") + 1] == "shm"  # on the store's host
    assert prefill[prefill.index("--host") + 1] == "198.18.7.1"
    assert router[router.index("--decode") + 1] == "http://198.18.7.2:8200" and router.count("--decode") == 2
    assert a.env == {"UCX_LOG_LEVEL": "error", "KVRELAY_KEYS": str(keys)}
    b = CP.plan(spec, spec.hosts["b"], "pool-y", tmp_path)
    assert [n for n, _ in b.processes] == ["decode0", "decode1"] and b.remote_store
    d0, d1 = (argv for _, argv in b.processes)
    assert d0[d0.index("--transport") + 1] == "tcp" and d0[d0.index("--port") + 1] == "8200"
    assert d1[d1.index("--block-size") + 1] == "64" and d1[d1.index("--store") + 1] == "tcp://198.18.7.1:5601"
    assert b.env["OMP_NUM_THREADS"] == "1"


BAD = [
    ("transport: carrier-pigeon", "transport: 'carrier-pigeon' is not one of tcp, nixl, shm"),
    ("hosts: {}", "hosts: missing or empty"),
    ("hosts: {a: {address: 127.0.0.1, store: {}, decode: [{}], router: {}, gpu: 1}}", "hosts.a: unknown field gpu"),
    ("hosts: {a: {address: myhost, store: {}, decode: [{}], router: {}}}", "hosts.a.address: 'myhost' is not an IP"),
    ("hosts: {a: {address: 0.0.0.0, store: {}, decode: [{}], router: {}}}", "hosts.a.address: 0.0.0.0 cannot be"),
    ("hosts: {a: {store: {}, decode: [{}], router: {}}}", "hosts.a.address: missing"),
    ("hosts: {a: {address: 127.0.0.1, store: {port: 0}, decode: [{}], router: {}}}",
     "hosts.a.store.port: 0 is not a port in 1..65535"),
    ("hosts: {a: {address: 127.0.0.1, store: {}, decode: [{port: 70000}], router: {}}}",
     "hosts.a.decode[0].port: 70000"),
    ("hosts: {a: {address: 127.0.0.1, store: {}, decode: [{block_size: 0}], router: {}}}",
     "hosts.a.decode[0].block_size: 0 is not an integer >= 1"),
    ("hosts: {a: {address: 127.0.0.1, store: {}, decode: [{port: 8000}], router: {}}}",
     "hosts.a.router.port: port 8000 is also hosts.a.decode[0].port's"),
    ("hosts: {a: {address: 127.0.0.1, decode: [{}], router: {}}}", "hosts: exactly one host runs the store; none"),
    ("hosts: {a: {address: 127.0.0.1, store: {}, router: {}}}", "hosts: no decode engine"),
    ("hosts: {a: {address: 127.0.0.1, store: {}, decode: [{}]}}", "hosts: no router"),
    ("hosts: {a: {address: 127.0.0.1, store: {}, decode: [{}], router: {}}, b: {address: 127.0.0.2}}",
     "hosts.b: runs nothing"),
    ("hosts: {a: {address: 198.18.7.1, store: {}, decode: [{}], router: {}}}",
     "keys: hosts.a.address 198.18.7.1 is not loopback"),
    ("keys: K\nhosts: {a: {address: 198.18.7.1, store: {}, router: {}}, b: {address: 198.18.7.1, decode: [{}]}}",
     "hosts.b.address: 198.18.7.1 is also hosts.a's"),
    ("transport: shm\nkeys: K\nhosts: {a: {address: 198.18.7.1, store: {}, router: {}}, "
     "b: {address: 198.18.7.2, decode: [{}]}}", "transport: shm moves KV within one host only"),
    ("env: {A: [1]}\nhosts: {}", "env.A: [1] is not a string or a number"),
    ("- a\n- b", "the file: expected a mapping"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_cluster_file_names_the_field(text, message):
    with pytest.raises(C.ClusterError) as err:
        C.parse(yaml.safe_load(text), "c.yaml")
    assert str(err.value).startswith("c.yaml: ") and message in str(err.value), str(err.value)


def test_which_host_is_this(tmp_path):
    spec = spec_of(TWO_HOSTS.replace("198.18.7.1", "127.0.0.1"))
    assert CP.find_host(spec, None).name == "a"  # the one host whose address is local here
    with pytest.raises(C.ClusterError, match="--host 'c' is not one of its hosts"):
        CP.find_host(spec, "c")
    with pytest.raises(C.ClusterError, match="198.18.7.2 is not an address of this machine"):
        CP.find_host(spec, "b")
    with pytest.raises(C.ClusterError, match="is not a directory on this host"):
        CP.plan(spec, spec.hosts["a"], "p", tmp_path)
    both = spec_of(TWO_HOSTS.replace("198.18.7.1", "127.0.0.1").replace("198.18.7.2", "127.0.0.1"))
    with pytest.raises(C.ClusterError, match=r"a \(127.0.0.1\), b \(127.0.0.1\); pass --host NAME"):
        CP.find_host(both, None)
    assert CP.interface_of("127.0.0.1") == "lo" and CP.interface_of("198.18.255.77") is None


def test_up_refuses_a_bad_file_in_one_line(tmp_path):
    bad = tmp_path / "cluster.yaml"
    bad.write_text(textwrap.dedent("""
        hosts:
          a: {address: 127.0.0.1, store: {}, decode: [{port: 99999}], router: {}}
    """))
    cases = [(["-f", str(bad)], f"{bad}: hosts.a.decode[0].port: 99999 is not a port"),
             (["-f", str(tmp_path / "missing.yaml")], "cannot read it"),
             (["--host", "a"], "give the file with -f")]
    for args, message in cases:
        proc = subprocess.run([sys.executable, "-m", "kvrelay.cli", "up", *args], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_keys_from_the_flag_or_the_environment(tmp_path, monkeypatch):
    """`kvrelay up -f FILE --keys DIR` (or $KVRELAY_KEYS) stands in for a file without `keys:`."""
    monkeypatch.delenv("KVRELAY_KEYS", raising=False)
    f = tmp_path / "c.yaml"
    f.write_text(TWO_HOSTS.replace("keys: KEYS\n", ""))
    with pytest.raises(C.ClusterError, match="keys: hosts.a.address 198.18.7.1 is not loopback"):
        C.load(f)
    assert C.load(f, keys="/k1").keys == "/k1"
    monkeypatch.setenv("KVRELAY_KEYS", "/k2")
    assert C.load(f).keys == "/k2" and C.load(f, keys="/k1").keys == "/k1"


def test_store_binds_one_address_it_can_advertise(tmp_path, monkeypatch):
    """The store gives clients its own address for its transports: a wildcard bind would hand them 0.0.0.0."""
    from kvrelay.store.config import StoreConfig
    monkeypatch.delenv("KVRELAY_KEYS", raising=False)
    with pytest.raises(ValueError, match="authentication"):
        StoreConfig(host="198.18.7.1", port=0)
    monkeypatch.setenv("KVRELAY_KEYS", str(key_dir(tmp_path)))
    for wildcard in ("0.0.0.0", "::"):
        with pytest.raises(ValueError, match="binds every address"):
            StoreConfig(host=wildcard, port=0)
    assert StoreConfig(host="198.18.7.1", port=0).host == "198.18.7.1"


def test_readme_cluster_file_is_valid(tmp_path):
    """The README's two-host cluster.yaml parses and plans as the README says."""
    import re
    from pathlib import Path
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = re.search(r"```yaml\n(# cluster.yaml\n.*?)```", readme, re.S)
    assert block, "README.md lost its cluster.yaml example"
    spec = C.parse(yaml.safe_load(block.group(1)), "README cluster.yaml")
    assert spec.store_address == "tcp://198.18.0.1:5600" and len(spec.urls("decode")) == 2
    assert spec.hosts["a"].router_port == 8000 and spec.keys == "/etc/kvrelay/keys"
