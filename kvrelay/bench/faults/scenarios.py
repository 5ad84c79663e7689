"""The faults: what each scenario breaks, and when, while the load runs.

Owns: the scenario functions and `SCENARIOS` (name -> the fault and the cluster options it needs), `QUICK`.
Must not touch: how the cluster is run or restarted (kvrelay up's supervisor does that), or the figures'
checks (suite.py, leaks.py, holdings.py).
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

from kvrelay.bench.faults.cluster import UpCluster, get, metric
from kvrelay.bench.faults.figures import Figures
from kvrelay.bench.faults.load import Load
from kvrelay.bench.faults.recovery import heal, recovery, restarted, store_recovery

Scenario = Callable[[UpCluster, Load, Figures], "threading.Thread | None"]


def _after_streaming(load: Load, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while load.streaming < n and time.monotonic() < deadline:
        time.sleep(0.01)


def _in_background(fn: Callable[[], None]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def kill_prefill(cluster: UpCluster, load: Load, fig: Figures) -> threading.Thread:
    def fault() -> None:
        _after_streaming(load, 1)
        pid, t = cluster.kill("prefill0"), time.monotonic()
        fig.notes.append(f"killed prefill0 (pid {pid}) after the first token")
        heal(cluster, fig, "prefill0", t, pid, need_kv=False, seed=11)
    return _in_background(fault)


def kill_decode_early(cluster: UpCluster, load: Load, fig: Figures) -> threading.Thread:
    def fault() -> None:
        while load.started < 2:
            time.sleep(0.001)
        pid, t = cluster.kill("decode0"), time.monotonic()
        fig.notes.append(f"killed decode0 (pid {pid}) before its first token")
        heal(cluster, fig, "decode0", t, pid, need_kv=False, seed=12)
    return _in_background(fault)


def _busiest(cluster: UpCluster, role: str) -> str:
    """The worker of ``role`` with the most sequences running now."""
    best, most = f"{role}0", -1.0
    for p in cluster.state().get("processes", []):
        if p["name"].startswith(role):
            try:
                running = metric(get(f"{p['address']}/metrics"), "kvrelay_engine_running")
            except OSError:
                continue
            if running > most:
                best, most = p["name"], running
    return best


def kill_decode_midstream(cluster: UpCluster, load: Load, fig: Figures) -> threading.Thread:
    def fault() -> None:
        _after_streaming(load, 3)
        name = _busiest(cluster, "decode")
        pid, t = cluster.kill(name), time.monotonic()
        fig.notes.append(f"killed {name} (pid {pid}), the decode with the most streams, mid-stream")
        heal(cluster, fig, name, t, pid, need_kv=False, seed=13)
    return _in_background(fault)


def kill_store(cluster: UpCluster, load: Load, fig: Figures) -> threading.Thread:
    def fault() -> None:
        _after_streaming(load, 1)
        pid, t_kill = cluster.kill("store"), time.monotonic()
        fig.notes.append(f"killed the store (pid {pid}) mid-transfer; kvrelay up restarts it")
        restarted(cluster, "store", pid)  # the supervisor's restart: a new pid, running
        back = time.monotonic()
        fig.notes.append(f"the store was back {back - t_kill:.1f}s after its kill (supervisor backoff + start-up "
                         f"+ SSD recovery, on cores the engines keep busy recomputing)")
        fig.recovery_s = store_recovery(cluster, back, fig)  # the figure: from its return
    return _in_background(fault)


def drop_connections(cluster: UpCluster, load: Load, fig: Figures) -> threading.Thread:
    def fault() -> None:
        _after_streaming(load, 1)
        port = cluster.process("store")["address"].rsplit(":", 1)[1]  # type: ignore[index]
        r = subprocess.run(["ss", "-K", "dst", "127.0.0.1", "dport", "=", port], capture_output=True, text=True)
        fig.notes.append(f"ss -K: dropped the TCP connections to the store's port {port} (rc {r.returncode})")
        fig.recovery_s = fig.first_answer_s = recovery(cluster, time.monotonic(), need_kv=True, seed=15)
    return _in_background(fault)


def corrupt_pool(cluster: UpCluster, load: Load, fig: Figures) -> threading.Thread:
    def fault() -> None:
        _after_streaming(load, 2)
        mine = f"kvrelay-up-{cluster.proc.pid}"
        pools = [f for f in os.listdir("/dev/shm") if f == mine]  # not its .dir or .owner sidecars
        rng = random.Random(16)
        flipped = 0
        for name in pools:
            path = Path("/dev/shm") / name
            size = path.stat().st_size
            with open(path, "r+b") as f:
                for _ in range(2000):  # scattered bytes over the first 64 MiB, where the live chunks sit
                    f.seek(rng.randrange(0, min(size, 64 << 20)))
                    f.write(bytes([rng.randrange(256)]))
                    flipped += 1
        fig.notes.append(f"overwrote {flipped} random bytes of the store's pool {pools}")
        fig.recovery_s = fig.first_answer_s = recovery(cluster, time.monotonic(), need_kv=False, seed=16)
    return _in_background(fault)


def _note(text: str) -> Scenario:
    def scenario(cluster: UpCluster, load: Load, fig: Figures) -> None:
        fig.notes.append(text)
    return scenario


# name -> (the fault, options: the cluster's (UpCluster's keywords) and the suite's: ``disconnect_after``
# (every client closes its stream after that many tokens), ``leave_after_s`` (every other client leaves that
# many seconds after sending instead: during its prefill leg) and ``watch_store`` (holdings.py: the store's
# pins and reserved bytes back within a second of the round's last abort))
SCENARIOS: dict[str, tuple[Scenario, dict[str, Any]]] = {
    "no-fault": (_note("the same load with no fault: the baseline for request times"), {}),
    "prefill-kill": (kill_prefill, {}),
    "decode-kill-before-first-token": (kill_decode_early, {}),
    "decode-kill-mid-stream": (kill_decode_midstream, {}),
    "store-kill-and-restart": (kill_store, {}),
    "connection-drop": (drop_connections, {}),
    "pool-corruption": (corrupt_pool, {}),
    "pool-full": (_note("a 4 MiB pool: most publishes are refused"), {"pool_size": "4MiB"}),
    "store-slow": (_note("the store delays every request by 300 ms"),
                   {"store_env": {"KVRELAY_FAULT_STORE_DELAY_MS": "300"}}),
    "client-disconnect": (_note("every other client closes its stream after 2 tokens, the rest 0.15 s after "
                                "sending (during the prefill leg); the store's pins and reserved bytes are watched "
                                "over time"), {"disconnect_after": 2, "leave_after_s": 0.15, "watch_store": True}),
}
QUICK = ("no-fault", "store-kill-and-restart", "decode-kill-mid-stream")
