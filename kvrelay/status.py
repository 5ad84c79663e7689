"""`kvrelay status`: every process of a running `kvrelay up`, its health, restarts, uptime and last exit.

Owns: finding the cluster (``--workdir``, else the newest running `kvrelay up`, see upstate.py), asking
each process's health endpoint (in parallel, with a short deadline), and printing a table or JSON.
Exit codes: 0 every process is running and healthy, 3 some are not, 1 no `kvrelay up` is running.  Must
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

from kvrelay import upstate


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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workdir = Path(args.workdir) if args.workdir else upstate.newest_workdir()
    state = upstate.read_state(workdir) if workdir is not None else None
    if state is None:
        where = f" in {args.workdir}" if args.workdir else ""
        print(f"kvrelay status: no `kvrelay up` is running{where}; start one with `kvrelay up`", file=sys.stderr)
        return 1
    procs = collect(state, args.timeout)
    text = json.dumps({"pid": state["pid"], "workdir": state["workdir"], "started": state["started"],
                       "processes": procs}, indent=2) if args.json else table(state, procs)
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `kvrelay status | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0 if all(p.get("state") == "running" and p["health"] == "ok" for p in procs) else 3
