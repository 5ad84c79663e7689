"""The router follows membership in etcd: a real etcd, a store, a prefill and decode reference engines that
register themselves (``kvrelay engine --etcd``), and ``kvrelay router --etcd`` with no worker on its command
line.  A decode added at run time gets traffic within a few seconds of registering; one killed with
SIGKILL is dropped within its lease, and requests keep succeeding (token-identical) throughout."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
import urllib.request

import pytest

from kvrelay import proc, status
from kvrelay.store.process import DaemonProcess
from upcluster import complete_ids
from waiting import wait_until

TTL = 3
PROMPT = list(range(5, 69))


def engine(tmp, etcd_url: str, role: str, name: str, store: str) -> proc.ChildProcess:
    return proc.spawn_kvrelay(["engine", "--role", role, "--store", store, "--port", "0", "--threads", "1",
                               "--num-layers", "2", "--num-blocks", "256", "--max-model-len", "1024",
                               "--log-level", "WARNING", "--etcd", etcd_url, "--cluster", "t", "--name", name,
                               "--etcd-ttl", str(TTL)],
                              name=name, log=tmp / f"{name}.log", ready_file=tmp / f"{name}.json",
                              die_with_parent=True, tail_lines=40)


def readyz(url: str) -> dict:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:  # 503 until a decode worker is in service
        return json.loads(exc.read())


def known(router: str, role: str) -> set[str]:
    return {b["url"] for b in readyz(router)["breakers"][role]}


def listed_router(listed: dict) -> str:
    names = [name for kind, name in listed if kind == "router"]
    assert len(names) == 1, listed
    return names[0]


def served(url: str) -> int:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return int(sum(float(v) for v in re.findall(r'^kvrelay_engine_requests_total\{[^}]*\} (\S+)$', text, re.M)))


@pytest.mark.slow  # etcd, a store, three engines and a router
@pytest.mark.timeout(300)
def test_router_follows_engines_registered_in_etcd(etcd, tmp_path):
    store = DaemonProcess(pool_size="256MiB", transports="shm", etcd=etcd.url, cluster="t", name="s1").start(
        log_path=str(tmp_path / "store.log"))
    procs: list[proc.ChildProcess] = []
    try:
        p1 = engine(tmp_path, etcd.url, "prefill", "p1", store.address)
        d1 = engine(tmp_path, etcd.url, "decode", "d1", store.address)
        procs += [p1, d1]
        router = proc.spawn_kvrelay(["router", "--port", "0", "--etcd", etcd.url, "--cluster", "t",
                                     "--policy", "round_robin", "--log-level", "INFO"],
                                    name="router", log=tmp_path / "router.log", ready_file=tmp_path / "router.json",
                                    die_with_parent=True, tail_lines=40)
        procs.append(router)
        url = router.wait_ready(60)["url"]
        p1_url, d1_url = p1.wait_ready(120)["url"], d1.wait_ready(120)["url"]
        wait_until(lambda: known(url, "prefill") == {p1_url} and known(url, "decode") == {d1_url}, 10,
                   "the router knows the registered prefill and decode", detail=router.log_tail)
        model = json.loads(urllib.request.urlopen(d1_url + "/v1/models", timeout=5).read())["data"][0]["id"]
        expected = complete_ids(url, PROMPT, model)
        assert expected is not None and len(expected) == 4
        listed = {(m["kind"], m["name"]): m for m in status.etcd_members(etcd.url, "t", 2.0)}
        assert set(listed) == {("store", "s1"), ("prefill", "p1"), ("decode", "d1"),
                               ("router", listed_router(listed))}
        assert all(m["health"] == ("-" if kind == "store" else "ok") for (kind, _), m in listed.items()), listed
        assert listed[("store", "s1")]["address"] == store.address
        assert listed[("decode", "d1")]["address"] == d1_url

        # a decode added at run time: in the router within a few seconds of registering, then serving
        d2 = engine(tmp_path, etcd.url, "decode", "d2", store.address)
        procs.append(d2)
        d2_url = d2.wait_ready(120)["url"]  # its ready file follows its registration
        t0 = time.monotonic()
        wait_until(lambda: d2_url in known(url, "decode"), 5, "d2 in the router's decode pool", detail=router.log_tail)
        joined_s = time.monotonic() - t0
        for _ in range(6):  # round robin over d1 and d2
            assert complete_ids(url, PROMPT, model) == expected
        assert served(d2_url) >= 2, "the decode added at run time got no traffic"
        print(f"d2 joined the router {joined_s:.2f}s after registering")

        # d2 killed: dropped within its lease while requests keep succeeding
        failures: list[str] = []
        answers = [0]
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                try:
                    got = complete_ids(url, PROMPT, model)
                    if got != expected:
                        failures.append(f"answer {got} != {expected}")
                    answers[0] += 1
                except Exception as exc:  # noqa: BLE001 -- any failure is what the test counts
                    failures.append(repr(exc))
        client = threading.Thread(target=load)
        client.start()
        try:
            wait_until(lambda: answers[0] >= 2, 30, "requests flowing before the kill")
            d2.signal(signal.SIGKILL)
            t_kill = time.monotonic()
            wait_until(lambda: d2_url not in known(url, "decode"), TTL + 5, "d2 dropped from the router",
                       detail=router.log_tail)
            dropped_s = time.monotonic() - t_kill
            n = answers[0]
            wait_until(lambda: answers[0] >= n + 3, 30, "requests after d2 was dropped")
        finally:
            stop.set()
            client.join(60)
        assert not failures, failures[:3]
        assert dropped_s <= TTL + 2.5, f"d2 dropped {dropped_s:.1f}s after its kill, lease {TTL}s"
        assert known(url, "decode") == {d1_url} and known(url, "prefill") == {p1_url}
        print(f"d2 dropped {dropped_s:.2f}s after SIGKILL (lease {TTL}s); {answers[0]} requests, none failed")

        # p1 stopped (SIGTERM): it revokes its lease, so the router drops it at once, not a lease later
        t_stop = time.monotonic()
        p1.signal(signal.SIGTERM)
        wait_until(lambda: p1_url not in known(url, "prefill"), TTL, "p1 dropped on its SIGTERM")
        assert time.monotonic() - t_stop < TTL - 1
        assert complete_ids(url, PROMPT, model) == expected  # the decode computes it alone
    finally:
        proc.stop_all(procs)
        store.stop()
