"""Cluster files with a store on every host that runs engines (issue 23): each host's engines use its own
store over shm, a decode may pull from the other hosts' stores (and only those), the router knows which
store each prefill publishes into; bad files are refused naming the field and the fix.  Plans only: no
process starts here (tests/multihost/test_netns_cluster.py runs clusters)."""

import pytest
import yaml

from kvrelay import cluster as C
from kvrelay import clusterplan as CP

PER_HOST = """
transport: tcp
keys: KEYS
hosts:
  p1: {address: 198.18.9.1, store: {}, prefill: [{}]}
  p2: {address: 198.18.9.2, store: {port: 5601}, prefill: [{port: 8101}]}
  d: {address: 198.18.9.3, store: {}, decode: [{}]}
  r: {address: 198.18.9.4, router: {}}
"""


def spec_of(text: str, keys: str) -> C.ClusterSpec:
    return C.parse(yaml.safe_load(text.replace("KEYS", keys)), "c.yaml")


@pytest.fixture
def keys(tmp_path) -> str:
    try:
        from kvrelay.security import write_keys
    except ImportError:  # no authentication in this build
        (tmp_path / "keys").mkdir()
        return str(tmp_path / "keys")
    return str(write_keys(tmp_path / "keys"))


def _flag(argv: list, flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_each_host_runs_its_own_store_and_its_engines_use_it_over_shm(keys, tmp_path):
    spec = spec_of(PER_HOST, keys)
    assert spec.per_host
    assert spec.stores == ["tcp://198.18.9.1:5600", "tcp://198.18.9.2:5601", "tcp://198.18.9.3:5600"]
    plans = {name: CP.plan(spec, h, "pool", tmp_path) for name, h in spec.hosts.items()}
    for name in ("p1", "p2", "d"):
        plan = plans[name]
        (first, store), (_, engine) = plan.processes
        assert first == "store" and not plan.remote_store
        assert isinstance(store, list) and isinstance(engine, list)
        own = f"tcp://{spec.hosts[name].address}:{spec.hosts[name].store['port']}"  # type: ignore[index]
        assert plan.store_address == own and _flag(engine, "--store") == [own]
        assert _flag(engine, "--transport") == ["shm"]  # its own host's store: no network
        assert "shm,tcp" in store
    decode = plans["d"].processes[1][1]
    assert isinstance(decode, list)
    assert _flag(decode, "--peer-store") == ["tcp://198.18.9.1:5600", "tcp://198.18.9.2:5601"]
    assert _flag(decode, "--remote-transport") == ["tcp"]
    prefill = plans["p1"].processes[1][1]
    assert isinstance(prefill, list) and "--peer-store" not in prefill  # a prefill publishes into its own only
    (_, router), = plans["r"].processes
    assert isinstance(router, list) and "--store" not in router
    assert _flag(router, "--prefill-store") == ["http://198.18.9.1:8100=tcp://198.18.9.1:5600",
                                                "http://198.18.9.2:8101=tcp://198.18.9.2:5601"]


def test_a_single_store_file_plans_as_before(keys, tmp_path):
    spec = spec_of("""
transport: tcp
keys: KEYS
hosts:
  a: {address: 198.18.9.1, store: {}, prefill: [{}], router: {}}
  b: {address: 198.18.9.2, decode: [{}]}
""", keys)
    assert not spec.per_host and spec.stores == [spec.store_address]
    b = CP.plan(spec, spec.hosts["b"], "pool", tmp_path)
    (_, decode), = b.processes
    assert isinstance(decode, list) and b.remote_store
    assert _flag(decode, "--store") == ["tcp://198.18.9.1:5600"] and _flag(decode, "--transport") == ["tcp"]
    assert "--peer-store" not in decode
    router = CP.plan(spec, spec.hosts["a"], "pool", tmp_path).processes[-1][1]
    assert isinstance(router, list)
    assert _flag(router, "--store") == ["tcp://198.18.9.1:5600"] and "--prefill-store" not in router


BAD = [
    ("hosts: {p: {address: 198.18.9.1, store: {}, prefill: [{}]}, d: {address: 198.18.9.2, store: {}, decode: [{}]},"
     " e: {address: 198.18.9.3, decode: [{}]}, r: {address: 198.18.9.4, router: {}}}",
     "hosts.e: runs engines but no store, while hosts p, d run one each: give it `store: {}` too"),
    ("hosts: {p: {address: 198.18.9.1, store: {}, prefill: [{}]}, d: {address: 198.18.9.2, store: {}, decode: [{}]},"
     " r: {address: 198.18.9.4, store: {}, router: {}}}",
     "hosts.r.store: this host runs no engines"),
    ("hosts: {p: {address: 127.0.0.1, store: {}, prefill: [{}]}, d: {address: 127.0.0.1, store: {}, decode: [{}], "
     "router: {}}}", "hosts.d.store.port: 127.0.0.1:5600 is also hosts.p's store"),
    ("transport: shm\nhosts: {p: {address: 198.18.9.1, store: {}, prefill: [{}]}, "
     "d: {address: 198.18.9.2, store: {}, decode: [{}], router: {}}}", "transport: shm moves KV within one host"),
    ("hosts: {a: {address: 127.0.0.1, decode: [{}], router: {}}}", "hosts: exactly one host runs the store; none does "
                                                                   "(or give every host that runs engines its own"),
    ("hosts: {p: {address: 127.0.0.1, store: {port: 5611}, prefill: [{}]}, d: {address: 127.0.0.1, "
     "store: {port: 5612}, decode: [{}], router: {}}}",
     "hosts.p.store.events_port: 127.0.0.1:5612 (its KV events) is also hosts.d.store.port: give `events_port` a port"),
    ("hosts: {p: {address: 198.18.9.1, store: {events_port: 8099}, prefill: [{}]}, d: {address: 198.18.9.2, "
     "store: {}, decode: [{}], router: {}}}",
     "hosts.p.store.events_port: 198.18.9.1:8100 (their replay) is also hosts.p.prefill[0].port"),
    ("hosts: {p: {address: 198.18.9.1, store: {events_port: 65535}, prefill: [{}]}, d: {address: 198.18.9.2, "
     "store: {}, decode: [{}], router: {}}}", "hosts.p.store.events_port: 65535 leaves no port for the replay"),
    ("hosts: {p: {address: 198.18.9.1, store: {}, prefill: [{keep_remote_prefix: true}]}, d: {address: 198.18.9.2, "
     "store: {}, decode: [{}], router: {}}}", "hosts.p.prefill[0].keep_remote_prefix: only a reference decode"),
    ("hosts: {p: {address: 198.18.9.1, store: {}, prefill: [{}]}, d: {address: 198.18.9.2, "
     "store: {}, decode: [{keep_remote_prefix: 1}], router: {}}}",
     "hosts.d.decode[0].keep_remote_prefix: 1 is not true or false"),
    ("hosts: {p: {address: 198.18.9.1, store: {}, prefill: [{}]}, d: {address: 198.18.9.2, "
     "decode: [{}, {keep_remote_prefix: true}], router: {}}}",
     "hosts.d.decode[1].keep_remote_prefix: with one store for the cluster no prefix is another host's"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_store_per_host_file_names_the_field_and_the_fix(text, message):
    with pytest.raises(C.ClusterError) as err:
        C.parse(yaml.safe_load("keys: K\n" + text), "c.yaml")
    assert str(err.value).startswith("c.yaml: ") and message in str(err.value), str(err.value)


def test_loopback_hosts_may_each_run_a_store_on_its_own_port(tmp_path):
    spec = C.parse(yaml.safe_load("""
hosts:
  p: {address: 127.0.0.1, store: {port: 5611}, prefill: [{port: 8111}]}
  d: {address: 127.0.0.1, store: {port: 5614}, decode: [{port: 8212}], router: {port: 8011}}
"""), "c.yaml")  # 5612 and 5613: p's store's KV events (its port + 1, + 2)
    assert spec.per_host and spec.stores == ["tcp://127.0.0.1:5611", "tcp://127.0.0.1:5614"]
    d = CP.plan(spec, spec.hosts["d"], "pool", tmp_path)
    decode, router = d.processes[1][1], d.processes[2][1]
    assert isinstance(decode, list) and isinstance(router, list)
    assert _flag(decode, "--peer-store") == ["tcp://127.0.0.1:5611"]
    assert _flag(router, "--prefill-store") == ["http://127.0.0.1:8111=tcp://127.0.0.1:5611"]


def test_a_vllm_decode_is_given_the_other_hosts_stores(keys, tmp_path):
    spec = spec_of(PER_HOST.replace("transport: tcp", "transport: tcp\nengine: vllm\nmodel: {checkpoint: /m}"), keys)
    d = spec.hosts["d"]
    launch = CP._vllm(spec, d, d.engines[0], "shm", 0, tmp_path, "decode0")  # what plan() runs (after its checks)
    assert launch.peer_stores == ("tcp://198.18.9.1:5600", "tcp://198.18.9.2:5601")
    assert launch.remote_transport == "tcp" and launch.transport == "shm"
    p1 = spec.hosts["p1"]
    assert CP._vllm(spec, p1, p1.engines[0], "shm", 0, tmp_path, "prefill0").peer_stores == ()


def test_every_store_publishes_its_kv_events_and_the_router_follows_them_all(keys, tmp_path):
    """With a store on every host: each store publishes its KV events on its host's address (its port + 1, the
    replay socket + 2, or the file's events_port), and the router follows every store's under its control
    address (the name its prefix hints use), so `kvrelay up -f` needs no hand-given --events."""
    spec = spec_of(PER_HOST.replace("store: {port: 5601}", "store: {port: 5601, events_port: 5700}"), keys)
    plans = {name: CP.plan(spec, h, "pool", tmp_path) for name, h in spec.hosts.items()}
    want = {"p1": ("tcp://198.18.9.1:5601", "tcp://198.18.9.1:5602"),
            "p2": ("tcp://198.18.9.2:5700", "tcp://198.18.9.2:5701"),
            "d": ("tcp://198.18.9.3:5601", "tcp://198.18.9.3:5602")}
    for name, (pub, replay) in want.items():
        store = plans[name].processes[0][1]
        assert isinstance(store, list)
        assert _flag(store, "--events") == [pub] and _flag(store, "--events-replay") == [replay]
        assert plans[name].env["KVRELAY_KEYS"] == keys  # off loopback the publisher is a CURVE server (plane events)
    (_, router), = plans["r"].processes
    assert isinstance(router, list)
    assert _flag(router, "--events") == [f"{spec.stores[i]}={pub},{replay}" for i, (pub, replay)
                                         in enumerate(want.values())]
    from kvrelay.router.config import RouterConfig
    cfg = RouterConfig(prefill=tuple(_flag(router, "--prefill")), decode=tuple(_flag(router, "--decode")),
                       events=tuple(_flag(router, "--events")))
    assert [s.name for s in cfg.event_sources()] == spec.stores  # the router accepts them, named by store


def test_without_keys_a_store_refuses_to_publish_its_events_off_loopback(monkeypatch):
    """The planned endpoint off loopback is refused without authentication (what `kvrelay store --events`
    builds), before anything binds: a cluster file off loopback without keys is refused earlier (cluster.py)."""
    from kvrelay.events.publisher import EventPublisher
    monkeypatch.delenv("KVRELAY_KEYS", raising=False)
    with pytest.raises(ValueError, match="non-loopback address only with authentication"):
        EventPublisher("tcp://198.18.9.1:5601", "tcp://198.18.9.1:5602")


def test_one_store_for_the_cluster_publishes_no_events(keys, tmp_path):
    spec = spec_of("""
transport: tcp
keys: KEYS
hosts:
  a: {address: 198.18.9.1, store: {}, prefill: [{}], router: {}}
  b: {address: 198.18.9.2, decode: [{}]}
""", keys)
    a = CP.plan(spec, spec.hosts["a"], "pool", tmp_path)
    store, router = a.processes[0][1], a.processes[-1][1]
    assert isinstance(store, list) and isinstance(router, list)
    assert "--events" not in store and "--events" not in router


def test_keep_remote_prefix_is_passed_to_that_decode_only(keys, tmp_path):
    spec = spec_of(PER_HOST.replace("decode: [{}]", "decode: [{keep_remote_prefix: true}, {}]"), keys)
    d = CP.plan(spec, spec.hosts["d"], "pool", tmp_path)
    kept, plain = d.processes[1][1], d.processes[2][1]
    assert isinstance(kept, list) and isinstance(plain, list)
    assert "--keep-remote-prefix" in kept and "--keep-remote-prefix" not in plain


def test_vllm_servers_of_hosts_on_one_address_are_pinned_to_different_cores(keys, tmp_path, monkeypatch):
    """Hosts on one address share a machine: each vLLM server pins its OpenMP threads to a core, and two workers
    pinned to one core stalled each other here (a prefill's step waited until the decode's pull gave up)."""
    import os
    monkeypatch.setattr(CP, "_check_vllm", lambda spec, host: None)  # a plan only: no checkpoint, no vLLM needed
    spec = spec_of("""
engine: vllm
model: {checkpoint: /m}
keys: KEYS
hosts:
  a: {address: 127.0.0.1, store: {port: 5611}, prefill: [{port: 8111}]}
  b: {address: 127.0.0.1, store: {port: 5614}, decode: [{port: 8212}], router: {port: 8011}}
  c: {address: 198.18.9.3, store: {port: 5617}, decode: [{port: 8213}]}
""", keys)
    cores = sorted(os.sched_getaffinity(0))

    def core_of(host: str) -> int:
        (launch,) = [p for _, p in CP.plan(spec, spec.hosts[host], "pool", tmp_path).processes
                     if isinstance(p, CP.VllmSpec)]
        return launch.cpu_core
    assert core_of("a") == cores[0]
    assert core_of("b") == cores[1 % len(cores)]  # after a's server: same machine
    assert core_of("c") == cores[0]  # another machine starts at its first core


def test_tensor_parallel_vllm_engines_get_a_core_per_rank_and_one_head_cut(keys, tmp_path, monkeypatch):
    """``tensor_parallel_size`` on vLLM engines: a core per rank (after the cores of the servers before it on the
    machine), and, since the TP sizes differ, every server the same head_slices: the least common multiple of the
    ranks holding heads of their own, from the checkpoint's KV head count."""
    import json
    import os
    monkeypatch.setattr(CP, "_check_vllm", lambda spec, host: None)  # a plan only: no vLLM needed
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"num_attention_heads": 8, "num_key_value_heads": 4}))
    spec = spec_of(f"""
engine: vllm
model: {{checkpoint: {ckpt}}}
keys: KEYS
hosts:
  a: {{address: 127.0.0.1, store: {{port: 5621}}, prefill: [{{port: 8121, tensor_parallel_size: 2}}]}}
  b: {{address: 127.0.0.1, decode: [{{port: 8221}}], router: {{port: 8021}}}}
""", keys)
    cores = sorted(os.sched_getaffinity(0))

    def launch_of(host: str):
        (launch,) = [p for _, p in CP.plan(spec, spec.hosts[host], "pool", tmp_path).processes
                     if isinstance(p, CP.VllmSpec)]
        return launch
    a, b = launch_of("a"), launch_of("b")
    assert (a.tensor_parallel_size, a.cpu_core) == (2, f"{cores[0]}|{cores[1 % len(cores)]}")
    assert (b.tensor_parallel_size, b.cpu_core) == (1, cores[2 % len(cores)])  # the cores after a's two ranks
    assert a.head_slices == b.head_slices == 2  # lcm(min(2, 4), min(1, 4))
    (ckpt / "config.json").write_text(json.dumps({"num_attention_heads": 8, "num_key_value_heads": 1}))
    assert CP.head_slices(spec) == 1  # one KV head: replicated on both ranks, published once
    with pytest.raises(C.ClusterError, match=r"prefill\[0\]\.tensor_parallel_size.*integer >= 1"):
        spec_of(f"""
engine: vllm
model: {{checkpoint: {ckpt}}}
keys: KEYS
hosts:
  a: {{address: 127.0.0.1, store: {{port: 5621}}, prefill: [{{tensor_parallel_size: 0}}]}}
""", keys)
    with pytest.raises(C.ClusterError, match="applies to vLLM engines"):
        spec_of("""
keys: KEYS
hosts:
  a: {address: 127.0.0.1, store: {port: 5621}, prefill: [{tensor_parallel_size: 2}]}
""", keys)
