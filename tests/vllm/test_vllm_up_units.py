"""`kvrelay up --engine vllm` without starting anything: the vLLM server's command line (host, KV events over
ipc://), the plan's wiring of each server's KV events to the router, and the errors for bad endpoints."""

from __future__ import annotations

import json

import pytest

from kvrelay.engines.vllm.process import VllmServer, kv_events_config
from kvrelay.hostplan import Join, VllmSpec, resolve
from kvrelay.launcher import build_parser
from kvrelay.localplan import local_plan
from kvrelay.router.cacheview import parse_events


@pytest.fixture
def ckpt(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def test_kv_events_config_is_ipc_only():
    cfg = kv_events_config("ipc:///tmp/x/decode0.kv")
    assert cfg == {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "ipc:///tmp/x/decode0.kv",
                   "replay_endpoint": "ipc:///tmp/x/decode0.kv.replay", "topic": ""}
    for bad in ("tcp://*:5557", "tcp://127.0.0.1:5557", "ipc://"):
        with pytest.raises(ValueError, match="give ipc://PATH"):
            kv_events_config(bad)
    with pytest.raises(ValueError, match="longer than"):
        kv_events_config("ipc:///" + "d" * 120)


def test_server_argv_has_host_and_events(ckpt):
    srv = VllmServer(ckpt, port=8123, kv_events="ipc:///tmp/x/p.kv")
    argv = srv.argv
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and srv.url == "http://127.0.0.1:8123"
    assert json.loads(argv[argv.index("--kv-events-config") + 1])["endpoint"] == "ipc:///tmp/x/p.kv"
    other = VllmServer(ckpt, port=8124, host="198.18.0.2")
    assert other.argv[other.argv.index("--host") + 1] == "198.18.0.2" and other.url == "http://198.18.0.2:8124"
    assert other.env["VLLM_HOST_IP"] == "198.18.0.2" and "--kv-events-config" not in other.argv
    with pytest.raises(ValueError, match="give ipc://PATH"):
        VllmServer(ckpt, kv_events="tcp://*:5557")
    assert srv.ready_info() is None  # not spawned: not ready


def test_plan_feeds_each_vllm_servers_events_to_the_router(tmp_path, ckpt):
    args = build_parser().parse_args(["--engine", "vllm", "--checkpoint", str(ckpt), "--demo"])
    plan = local_plan(args, "kvrelay-up-test", tmp_path, [])
    launches = dict(plan.processes)
    for name in ("prefill0", "decode0"):
        spec = launches[name]
        assert isinstance(spec, VllmSpec) and spec.kv_events == f"ipc://{tmp_path.resolve()}/{name}.kv"
        assert spec.host == "127.0.0.1"
    assert launches["colocated"].kv_events is None  # type: ignore[union-attr]
    router = launches["router"]
    events = [router[i + 1] for i, a in enumerate(router) if a == "--events"]
    assert len(events) == 2 and all(isinstance(e, Join) for e in events)
    ready = {"store": {"address": "tcp://127.0.0.1:5600"}}
    for i, name in enumerate(("prefill0", "decode0")):
        ready[name] = {"url": f"http://127.0.0.1:{9000 + i}", "events": f"ipc:///w/{name}.kv",
                       "events_replay": f"ipc:///w/{name}.kv.replay"}
    argv = resolve(router, ready)
    spec = argv[argv.index("--events") + 1]
    assert spec == "http://127.0.0.1:9000=ipc:///w/prefill0.kv,ipc:///w/prefill0.kv.replay"
    source = parse_events(spec, {"http://127.0.0.1:9000", "http://127.0.0.1:9001", "store"})
    assert (source.endpoint, source.replay) == ("ipc:///w/prefill0.kv", "ipc:///w/prefill0.kv.replay")


def test_up_refuses_a_directory_that_is_not_a_checkpoint(tmp_path, ckpt):
    from kvrelay.launcher import check_args
    args = build_parser().parse_args(["--engine", "vllm", "--checkpoint", str(tmp_path / "nothing")])
    error = check_args(args)
    assert error is not None and "is not a checkpoint directory (config.json" in error
    assert check_args(build_parser().parse_args(["--engine", "vllm"])).startswith("--engine vllm needs --checkpoint")
    ok = check_args(build_parser().parse_args(["--engine", "vllm", "--checkpoint", str(ckpt)]))
    from kvrelay.engines.vllm.process import setup_problem
    assert ok == (None if setup_problem(ckpt) is None else f"--engine vllm --checkpoint {ckpt}: {setup_problem(ckpt)}")


def test_ready_info_sends_the_warm_up_on_a_thread_and_retries_a_failed_one(ckpt):
    """A supervisor asks ready_info on its loop: the warm-up prompt (up to a minute on a busy machine) must not
    hold that loop, so it runs on a thread; a failed one is sent again, and the server is ready once one came
    back."""
    import threading
    from types import SimpleNamespace

    from waiting import wait_until
    srv = VllmServer(ckpt, port=8125)
    srv.process = SimpleNamespace(alive=lambda: True, pid=4242)  # type: ignore[assignment]
    srv.healthy = lambda timeout=2.0: True  # type: ignore[method-assign]
    release, calls = threading.Event(), []

    def complete(tokens, max_tokens=16, timeout=300.0, **kw):
        calls.append(len(tokens))
        if len(calls) == 1:
            raise RuntimeError("HTTP 500: the engine is not up yet")
        assert release.wait(60), "the test never released the warm-up"
        return {}
    srv.complete = complete  # type: ignore[method-assign]
    assert srv.ready_info() is None  # the first warm-up starts (and fails) on its thread
    wait_until(lambda: srv._warming is not None and not srv._warming.thread.is_alive(), 10, "the first warm-up")
    assert srv.ready_info() is None  # its failure is reported: not ready
    assert srv.ready_info() is None and not release.is_set()  # the second is sent; this call did not wait on it
    wait_until(lambda: calls == [16, 16], 10, "the second warm-up sent")
    release.set()
    info = wait_until(srv.ready_info, 10, "ready once the warm-up came back")
    assert info["pid"] == 4242 and info["url"] == "http://127.0.0.1:8125"
    assert srv.ready_info() is not None and calls == [16, 16]  # warmed up: never sent again in this run


def test_up_warns_when_vllm_servers_share_a_core(ckpt, capsys):
    from kvrelay.launcher import _warn_shared_cores

    def spec(core: int) -> VllmSpec:
        return VllmSpec(str(ckpt), "m", 32, 1.0, core, None, "shm", 60.0)
    _warn_shared_cores([("prefill0", spec(0)), ("decode0", spec(1))])
    assert capsys.readouterr().err == ""
    _warn_shared_cores([("prefill0", spec(0)), ("decode0", spec(1)), ("colocated", spec(0))])
    err = capsys.readouterr().err
    assert "the vLLM servers prefill0, colocated share core 0" in err and "decode0" not in err


def test_the_demos_colocated_server_never_shares_the_prefills_core(tmp_path, ckpt, monkeypatch):
    import os
    args = build_parser().parse_args(["--engine", "vllm", "--checkpoint", str(ckpt), "--demo"])
    for cpus, want in (({0, 1}, {"prefill0": 0, "decode0": 1, "colocated": 1}),
                       ({0, 1, 2, 3}, {"prefill0": 0, "decode0": 1, "colocated": 2})):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, cpus=cpus: cpus)
        plan = local_plan(args, "kvrelay-up-test", tmp_path, [])
        got = {name: p.cpu_core for name, p in plan.processes if isinstance(p, VllmSpec)}
        assert got == want, (cpus, got)


def test_reap_shm_removes_only_unmapped_segments_of_this_run():
    """What a SIGKILLed vLLM run leaves in /dev/shm is removed when its server stops or restarts; a segment a
    live process maps, or one older than the run, is not."""
    import time
    from multiprocessing import resource_tracker, shared_memory

    import uuid

    from kvrelay.engines.vllm.process import SHM_DIR, reap_shm
    from waiting import wait_until
    old = shared_memory.SharedMemory(create=True, size=4096)  # from before the run
    old.close()
    since = (SHM_DIR / old.name).stat().st_ctime + 0.05  # the run started after it
    wait_until(lambda: time.time() > since + 0.05, 5, "the clock past the run's start")
    live = shared_memory.SharedMemory(create=True, size=4096)  # mapped by this process
    left = shared_memory.SharedMemory(create=True, size=4096)
    left.close()  # unmapped, never unlinked: what a killed process leaves
    tp = SHM_DIR / f"vllm_dist_{uuid.uuid4().hex}-tp:0-[0-1]-cpushm_0"  # vLLM's TP all-reduce buffer, left
    tp.write_bytes(b"x" * 64)
    try:
        gone = reap_shm(since, slack=0.0)
        assert left.name in gone and tp.name in gone and live.name not in gone and old.name not in gone
        assert not (SHM_DIR / left.name).exists() and (SHM_DIR / live.name).exists()
        assert (SHM_DIR / old.name).exists()
    finally:
        live.close()
        live.unlink()
        old.unlink()
        resource_tracker.unregister(f"/{left.name}", "shared_memory")  # reap_shm unlinked it
