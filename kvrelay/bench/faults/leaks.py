"""What a fault scenario must give back: file descriptors and threads of every process that was not
restarted, kvrelay shared-memory segments, engine sequences, the store's reservations and pins.

Owns: `snapshot` (a baseline) and `leaks` (what was not given back once the load drained).  Must not
touch: the faults or the load.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

from kvrelay.bench.faults.cluster import UpCluster, get, metric
from kvrelay.bench.faults.figures import Figures

PIN_TTL_S = 30.0  # the store's pull_pin_ttl default: a pin older than this is a leak
SEQ_SETTLE_S = 10.0  # an engine still running or queueing the load's requests this long after it drained leaks them


def _proc_counts(pid: int) -> tuple[int, int]:
    try:
        return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return -1, -1


def _fd_targets(pid: int) -> Counter[str]:
    out: Counter[str] = Counter()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            out[target.split(":[")[0] if ":[" in target else target] += 1
    except OSError:
        pass
    return out


def snapshot(cluster: UpCluster) -> dict[str, Any]:
    procs = {p["name"]: int(p["pid"]) for p in cluster.state().get("processes", []) if p.get("pid")}
    mine = f"kvrelay-up-{cluster.proc.pid}"  # the pool kvrelay up names for its store (and its .dir)
    return {"pids": procs, "counts": {n: _proc_counts(pid) for n, pid in procs.items()},
            "fds": {n: _fd_targets(pid) for n, pid in procs.items()},
            "shm": sorted(f for f in os.listdir("/dev/shm") if f.startswith(mine))}


def leaks(cluster: UpCluster, before: dict[str, Any], warm: dict[str, Any], fig: Figures, fd_slack: int = 8,
          thread_slack: int = 4, router_fd_slack: int = 40) -> dict[str, int]:
    """After the load has drained: what was not given back (new file descriptors are named in the notes)."""
    time.sleep(1.0)
    out: dict[str, int] = {}
    now = snapshot(cluster)
    for name, pid in now["pids"].items():
        if before["pids"].get(name) != pid or warm["pids"].get(name) != pid:
            continue  # restarted: a fresh process still warming up (its pools, links) is not leaking
        fd0, th0 = before["counts"][name]
        fd1, th1 = now["counts"][name]
        # the router pools its upstream connections (two legs per request): that pool may still be filling
        out[f"fds:{name}"] = max(0, fd1 - fd0 - (router_fd_slack if name == "router" else fd_slack))
        out[f"threads:{name}"] = max(0, th1 - th0 - thread_slack)
        if out[f"fds:{name}"]:
            grown = now["fds"][name] - before["fds"][name]
            fig.notes.append(f"{name}: new file descriptors {dict(grown.most_common(6))}")
    # kvrelay up's store pool keeps its name across restarts: more files under it than before is a leak
    out["shm_segments"] = max(0, len(now["shm"]) - len(before["shm"]))
    for p in cluster.state().get("processes", []):
        url = p.get("address", "")
        try:
            if p["name"].startswith(("prefill", "decode")):
                deadline = time.monotonic() + SEQ_SETTLE_S
                while True:  # an engine handles aborts between steps: one under way (say a decode recomputing
                    text = get(f"{url}/metrics")  # the prompt of a prefill aborted meanwhile) ends first
                    busy = int(metric(text, "kvrelay_engine_running") + metric(text, "kvrelay_engine_waiting"))
                    if not busy or time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
                out[f"busy_seqs:{p['name']}"] = busy
            elif p["name"] == "store" and p.get("health_url"):
                url = p["health_url"].replace("/healthz", "/metrics")
                deadline = time.monotonic() + PIN_TTL_S + 5
                while True:  # pins are handed back with a client's next call, or expire: wait for either
                    text = get(url)
                    held = metric(text, "kvrelay_store_chunks", tier="reserved") + metric(text, "kvrelay_store_pins")
                    if not held or time.monotonic() > deadline:
                        break
                    time.sleep(1.0)
                out["store_reserved_chunks"] = int(metric(text, "kvrelay_store_chunks", tier="reserved"))
                out["store_pins"] = int(metric(text, "kvrelay_store_pins"))
        except OSError:
            out[f"unreachable:{p['name']}"] = 1
    return out
