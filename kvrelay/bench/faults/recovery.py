"""How long a cluster takes to heal after a fault: probe requests, the store back in every component's
service, a killed worker restarted and back in the router's service.

Owns: the recovery probes and the waits for service.  Must not touch: the faults or the load.
"""

from __future__ import annotations

import json
import random
import time

from kvrelay.bench.faults.cluster import UpCluster, get, metric, post
from kvrelay.bench.faults.figures import Figures
from kvrelay.bench.faults.load import MAX_TOKENS, random_prompt, reference


def _pulled_ok(cluster: UpCluster) -> float:
    """Pulls that succeeded, over every decode engine (a decode answering without its store does not count)."""
    total = 0.0
    for p in cluster.state().get("processes", []):
        if p["name"].startswith("decode"):
            try:
                total += metric(get(f"{p['address']}/metrics"), "kvrelay_engine_pulls_total", result="ok")
            except OSError:
                pass
    return total


def probe_ok(cluster: UpCluster, prompt: list[int], want: list[int], need_kv: bool) -> bool:
    """One non-streaming request through the router: the right answer (and, with need_kv, its KV pulled
    from the store by the decode: P/D as normal, not a decode computing alone)."""
    body = {"model": cluster.model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True}
    pulled = _pulled_ok(cluster) if need_kv else 0.0
    try:
        ans = post(f"{cluster.router}/v1/completions", body, timeout=30)
    except (OSError, ValueError):
        return False
    if ans.get("choices", [{}])[0].get("token_ids") != want:
        return False
    return not need_kv or _pulled_ok(cluster) > pulled


def recovery(cluster: UpCluster, since: float, need_kv: bool, seed: int, limit: float = 60.0) -> float:
    """Seconds from ``since`` until a probe request is answered right (inf: not within ``limit``)."""
    rng = random.Random(seed)
    while time.monotonic() - since < limit:
        prompt = random_prompt(rng, 64)
        want = reference(cluster, prompt)
        if probe_ok(cluster, prompt, want, need_kv):
            return time.monotonic() - since
        time.sleep(0.1)
    return float("inf")


def store_in_service(cluster: UpCluster) -> bool:
    """Every engine's store breaker is closed and the router sees the store up."""
    for p in cluster.state().get("processes", []):
        try:
            text = get(f"{p['address']}/metrics") if p["name"].startswith(("prefill", "decode", "router")) else ""
        except OSError:
            return False
        if p["name"] == "router" and metric(text, "kvrelay_router_store_up") < 1:
            return False
        if p["name"] != "router" and metric(text, "kvrelay_engine_store_breaker_open") > 0:
            return False
    return True


def store_recovery(cluster: UpCluster, since: float, fig: Figures, limit: float = 60.0) -> float:
    """Seconds from ``since`` until every component has the store back in service; the first P/D answer after
    that (it queues behind the load still running) goes in the notes."""
    while time.monotonic() - since < limit and not store_in_service(cluster):
        time.sleep(0.05)
    back = time.monotonic() - since
    fig.first_answer_s = recovery(cluster, since, need_kv=True, seed=14, limit=limit)
    fig.notes.append(f"every breaker closed {back:.2f}s after the store's return; the first request sent then "
                     f"answered with its KV pulled at {fig.first_answer_s:.2f}s (behind the load still running)")
    return back


def all_workers_in_service(cluster: UpCluster) -> bool:
    """The router has every prefill and decode worker in service (their breakers closed)."""
    try:
        ready = json.loads(get(f"{cluster.router}/readyz"))
    except (OSError, ValueError):
        return False
    # half-open: a probe answered and the router sends it requests again (one success closes it)
    return all(b["state"] in ("closed", "half_open") for role in ("prefill", "decode")
               for b in ready["breakers"][role])


def restarted(cluster: UpCluster, name: str, old_pid: int, limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        p = cluster.process(name) or {}
        if p.get("pid") not in (None, old_pid) and p.get("state") == "running":
            return
        time.sleep(0.05)


def heal(cluster: UpCluster, fig: Figures, name: str, t_kill: float, old_pid: int, need_kv: bool,
         seed: int) -> None:
    """After killing ``name``: the first right answer, then the killed process restarted and back in service."""
    fig.first_answer_s = recovery(cluster, t_kill, need_kv=need_kv, seed=seed)
    restarted(cluster, name, old_pid)
    deadline = time.monotonic() + 60
    while not all_workers_in_service(cluster) and time.monotonic() < deadline:
        time.sleep(0.05)
    fig.recovery_s = time.monotonic() - t_kill
    fig.notes.append(f"{name} restarted and back in the router's service {fig.recovery_s:.1f}s after its kill "
                     f"(mostly the engine loading its model); requests kept being served meanwhile")
