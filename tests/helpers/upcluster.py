"""A `kvrelay up` cluster as its tests see it: its processes' state from `kvrelay status`, "every process
running and healthy", and a greedy completion through an OpenAI-compatible URL.

Importable in every test as ``from upcluster import healthy, complete_ids`` (pyproject's pytest
``pythonpath``)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from kvrelay import status, upstate


def processes(workdir: Path) -> dict[str, dict]:
    """`kvrelay status`'s processes of the cluster run in ``workdir``, by name ({} before it wrote its state)."""
    state = upstate.read_state(workdir)
    return {p["name"]: p for p in status.collect(state, 2.0)} if state else {}


def healthy(workdir: Path, **restarts: int) -> dict[str, dict] | None:
    """The processes if every one runs and answers healthy (and each named one was restarted exactly that
    many times), else None: a condition to wait on."""
    procs = processes(workdir)
    ok = procs and all(p["state"] == "running" and p["health"] == "ok" for p in procs.values()) and \
        all(procs[name]["restarts"] == n for name, n in restarts.items())
    return procs if ok else None


def complete_ids(url: str, tokens: list[int], model: str, token: str | None = None) -> list[int] | None:
    """The greedy answer's token ids (4 tokens), or None while the router has no worker in service (503)."""
    body = json.dumps({"model": model, "prompt": tokens, "max_tokens": 4, "temperature": 0,
                       "return_token_ids": True}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(f"{url}/v1/completions", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return list(json.loads(r.read())["choices"][0]["token_ids"])
    except urllib.error.HTTPError as exc:
        if exc.code != 503:
            raise
        return None
