"""`kvrelay status`: every process of a running `kvrelay up`, its health, restarts, uptime and last exit; with
``--etcd URL``, every member etcd knows of a cluster (kvrelay/membership), and its health.

Owns: finding the cluster (``--workdir``, else the newest running `kvrelay up`, see upstate.py), asking
each process's health endpoint (in parallel, with a short deadline), and printing a table or JSON.
Exit codes: 0 every process is running and healthy, 3 some are not, 1 no `kvrelay up` is running (with
``--etcd``: etcd does not answer).  Must
not touch: the processes (it only reads their state file and their health endpoints).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kvrelay import security, upstate


def probe(url: str, timeout: float) -> str:
    """``ok`` (HTTP 200), ``HTTP <code>``, ``down`` (no answer) or ``-`` (no health endpoint)."""
    if not url:
        return "-"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return "ok" if r.status == 200 else f"HTTP {r.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (OSError, urllib.error.URLError):
        return "down"


def exit_text(code: int | None) -> str:
    if code is None:
        return "-"
    if code < 0:
        try:
            return f"{code} ({signal.Signals(-code).name})"
        except ValueError:
            return str(code)
    return str(code)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def collect(state: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
    procs = [dict(p) for p in state.get("processes", [])]
    with ThreadPoolExecutor(max(1, len(procs))) as ex:
        healths = list(ex.map(lambda p: probe(p.get("health_url", "") if p.get("state") == "running" else "",
                                              timeout), procs))
    now = time.time()
    for p, health in zip(procs, healths, strict=True):
        p["health"] = health
        p["uptime_s"] = round(now - p["started"], 1) if p.get("state") == "running" and p.get("started") else None
    return procs


def table(state: dict[str, Any], procs: list[dict[str, Any]]) -> str:
    head = ("NAME", "PID", "STATE", "HEALTH", "RESTARTS", "UPTIME", "LAST EXIT", "ADDRESS")
    rows = [head] + [(p["name"], str(p.get("pid") or "-"), p.get("state", "?"), p["health"],
                      str(p.get("restarts", 0)) if p.get("supervised") else "-", duration(p["uptime_s"]),
                      exit_text(p.get("last_exit")), p.get("address") or "-") for p in procs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    lines = [f"kvrelay up (pid {state['pid']}) in {state['workdir']}, up {duration(time.time() - state['started'])}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvrelay status", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="", help="the work dir of the `kvrelay up` to show (default: the newest "
                                                 "one running)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--timeout", type=float, default=1.0, help="seconds to wait for each health answer")
    p.add_argument("--etcd", default="", metavar="URL",
                   help="list the members registered in this etcd (http://HOST:PORT) instead of a `kvrelay up`")
    p.add_argument("--cluster", default="default", help="with --etcd: the cluster to list")
    security.add_argument(p)  # with --etcd: an etcd with TLS is reached with the keys' client certificate
    return p


def etcd_members(endpoint: str, cluster: str, timeout: float) -> list[dict[str, Any]]:
    """Every member of ``cluster`` in etcd at ``endpoint`` with its health (HTTP members: GET /healthz);
    EtcdError if etcd does not answer."""
    import asyncio

    from kvrelay.membership import MembershipView

    async def listing() -> list[dict[str, Any]]:
        view = MembershipView(endpoint, cluster)
        view.client.timeout = max(timeout, 1.0)
        try:
            members = await view.list_once()
        finally:
            await view.stop()
        return [{"kind": m.kind, "name": m.name, "address": m.address, "attributes": m.attributes}
                for m in sorted(members.values(), key=lambda m: (m.kind, m.name))]
    rows = asyncio.run(listing())
    with ThreadPoolExecutor(max(1, len(rows))) as ex:
        healths = list(ex.map(lambda r: probe(r["address"].rstrip("/") + "/healthz"
                                              if r["address"].startswith("http") else "", timeout), rows))
    for r, health in zip(rows, healths, strict=True):
        r["health"] = health
    return rows


def members_table(endpoint: str, cluster: str, rows: list[dict[str, Any]]) -> str:
    head = ("KIND", "NAME", "HEALTH", "ADDRESS", "ATTRIBUTES")
    table_rows = [head] + [(r["kind"], r["name"], r["health"], r["address"],
                            " ".join(f"{k}={v}" for k, v in sorted(r["attributes"].items()))) for r in rows]
    widths = [max(len(t[i]) for t in table_rows) for i in range(len(head) - 1)]
    lines = [f"cluster {cluster!r} in etcd {endpoint}: {len(rows)} members"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(t[:-1], widths, strict=True)) + "  " + t[-1] for t in table_rows]
    return "\n".join(line.rstrip() for line in lines)


def main_etcd(args: argparse.Namespace) -> int:
    from kvrelay.membership import EtcdError, check_cluster, check_endpoint
    try:
        endpoint = check_endpoint(args.etcd, "--etcd")
        check_cluster(args.cluster)
        security.configure(args.keys)  # KeysError (a ValueError) names a bad directory
        rows = etcd_members(endpoint, args.cluster, args.timeout)
    except ValueError as exc:
        print(f"kvrelay status: {exc}", file=sys.stderr)
        return 2
    except EtcdError as exc:
        print(f"kvrelay status: {exc}", file=sys.stderr)
        return 1
    text = (json.dumps({"etcd": endpoint, "cluster": args.cluster, "members": rows}, indent=2) if args.json
            else members_table(endpoint, args.cluster, rows))
    _print(text)
    return 0 if all(r["health"] in ("ok", "-") for r in rows) else 3


def _print(text: str) -> None:
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `kvrelay status | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.etcd:
        return main_etcd(args)
    workdir = Path(args.workdir) if args.workdir else upstate.newest_workdir()
    state = upstate.read_state(workdir) if workdir is not None else None
    if state is None:
        where = f" in {args.workdir}" if args.workdir else ""
        print(f"kvrelay status: no `kvrelay up` is running{where}; start one with `kvrelay up`", file=sys.stderr)
        return 1
    procs = collect(state, args.timeout)
    text = json.dumps({"pid": state["pid"], "workdir": state["workdir"], "started": state["started"],
                       "processes": procs}, indent=2) if args.json else table(state, procs)
    _print(text)
    return 0 if all(p.get("state") == "running" and p["health"] == "ok" for p in procs) else 3
