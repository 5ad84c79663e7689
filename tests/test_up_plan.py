"""`kvrelay up` runs one host's plan: a single host's is generated from the flags (ports picked at start-up,
so the engines and the router refer to the processes started before them), and the router's settings are
one checked value.  No process is started here."""

import pytest

from kvrelay.hostplan import Ref, VllmSpec, is_engine, resolve
from kvrelay.launcher import build_parser
from kvrelay.localplan import local_plan
from kvrelay.router.config import RouterConfig


def plan_of(tmp_path, *flags):
    return local_plan(build_parser().parse_args(list(flags)), "kvrelay-up-test", tmp_path, [])


def test_single_host_plan_refers_to_what_it_started(tmp_path):
    plan = plan_of(tmp_path, "--num-prefill", "2", "--transport", "tcp", "--demo")
    names = [name for name, _ in plan.processes]
    assert names == ["store", "prefill0", "prefill1", "decode0", "colocated", "router"]
    assert [is_engine(launch) for _, launch in plan.processes] == [False, True, True, True, True, False]
    launches = dict(plan.processes)
    store = launches["store"]
    assert store[store.index("--transports") + 1] == "shm,tcp" and store[store.index("--port") + 1] == "0"
    assert store[store.index("--ssd-dir") + 1] == str(tmp_path / "ssd")
    decode = launches["decode0"]
    assert decode[decode.index("--store") + 1] == Ref("store", "address") == plan.store_address
    assert decode[decode.index("--transport") + 1] == "tcp" and decode[decode.index("--block-size") + 1] == "32"
    assert "--store" not in launches["colocated"]  # the demo's reference: no store, not routed to
    router = launches["router"]
    assert [router[i + 1] for i, a in enumerate(router) if a in ("--prefill", "--decode")] == \
        [Ref("prefill0", "url"), Ref("prefill1", "url"), Ref("decode0", "url")]
    ready = {"store": {"address": "tcp://127.0.0.1:5601"}, "prefill0": {"url": "http://127.0.0.1:1"},
             "prefill1": {"url": "http://127.0.0.1:2"}, "decode0": {"url": "http://127.0.0.1:3"}}
    argv = resolve(router, ready)
    assert argv[argv.index("--store") + 1] == "tcp://127.0.0.1:5601" and "http://127.0.0.1:3" in argv
    assert plan.labels["prefill1"] == "prefill" and plan.detailed and not plan.remote_store
    with pytest.raises(RuntimeError, match="decode0's url"):
        resolve(router, {k: v for k, v in ready.items() if k != "decode0"})


def test_single_host_vllm_plan(tmp_path):
    plan = plan_of(tmp_path, "--engine", "vllm", "--checkpoint", str(tmp_path), "--ssd-dir", "none")
    launches = dict(plan.processes)
    assert "--ssd-dir" not in launches["store"]
    decode = launches["decode0"]
    assert isinstance(decode, VllmSpec) and decode.connector == "KVRelayConnector" and decode.block_size == 32
    assert decode.name == tmp_path.name


def test_router_config_names_the_flag():
    assert RouterConfig(decode=("http://127.0.0.1:1",)).port == 8000
    for kw, words in (({"decode": ()}, "at least one --decode URL"), ({"retries": -1}, "--retries -1"),
                      ({"store": "127.0.0.1:5600"}, "--store '127.0.0.1:5600'"),
                      ({"retry_backoff": 2.0}, "--retry-backoff 2"), ({"decode_only_hit": 0.0}, "--decode-only-hit 0"),
                      ({"events": ("store=udp://127.0.0.1:5557",)}, "is not tcp://HOST:PORT")):
        with pytest.raises(ValueError, match=words):
            RouterConfig(**{"decode": ("http://127.0.0.1:1",), **kw})
    with pytest.raises(AttributeError):
        RouterConfig(decode=("http://127.0.0.1:1",)).port = 1  # type: ignore[misc]
