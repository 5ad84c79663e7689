"""The cluster a fault scenario breaks: a `kvrelay up` process and a colocated engine beside it, and the
HTTP helpers that read them.

Owns: `UpCluster` (start it through kvrelay/proc.py, find its processes in up.json, kill one, close it) and
`get` / `post` / `metric`.  Must not touch: the cluster's processes except to break them
(kvrelay/launcher.py and kvrelay/supervisor.py run and restart them).
"""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from pathlib import Path
from typing import Any

from kvrelay import proc
from kvrelay.httpjson import get_text
from kvrelay.promtext import parse_metrics, sum_samples

READY_TIMEOUT_S = 180.0


def get(url: str, timeout: float = 5.0) -> str:
    return get_text(url, timeout)


def post(url: str, body: dict, timeout: float = 60.0) -> dict:
    """POST JSON; the answer.  An HTTP error stays an OSError (urllib's HTTPError): the probes count it as a
    wrong answer, where kvrelay.httpjson would raise a RuntimeError."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (Prometheus text format)."""
    return sum_samples(parse_metrics(text), name, **labels)


class UpCluster:
    """A `kvrelay up` process (everything it starts is supervised) and a colocated engine beside it."""

    def __init__(self, workdir: Path, *, transport: str = "tcp", pool_size: str = "256MiB", num_prefill: int = 2,
                 num_decode: int = 2, store_env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **(store_env or {})}
        # own sessions, and SIGTERM when this thread dies: a killed bench leaves no cluster behind
        self.proc = proc.spawn_kvrelay(
            ["up", "--transport", transport, "--port", "0", "--pool-size", pool_size, "--num-prefill",
             str(num_prefill), "--num-decode", str(num_decode), "--workdir", str(workdir)], name="kvrelay up",
            log=workdir / "up.log", log_mode="ab", env=env, session=True, die_with_parent=True)
        self.colo = proc.spawn_kvrelay(["engine", "--role", "colocated", "--port", "0"], name="colocated engine",
                                       ready_file=workdir / "colocated.json", log=workdir / "colocated.log",
                                       log_mode="ab", session=True, die_with_parent=True)
        self.router = ""
        try:
            self.router = self.proc.wait_until(self._router_ready, READY_TIMEOUT_S, interval=0.2,
                                               what="serving through its router")
            self.colocated = self.colo.wait_ready(READY_TIMEOUT_S)["url"]
        except BaseException:
            self.close()
            raise
        self.model = json.loads(get(f"{self.router}/v1/models"))["data"][0]["id"]

    def _router_ready(self) -> str | None:
        router = self.process("router")
        if not router or router.get("state") != "running":
            return None
        try:
            return router["address"] if json.loads(get(f"{router['address']}/readyz")).get("ready") else None
        except (OSError, ValueError):
            return None

    def state(self) -> dict[str, Any]:
        try:
            return json.loads((self.workdir / "up.json").read_text())
        except (OSError, ValueError):
            return {}

    def process(self, name: str) -> dict[str, Any] | None:
        return next((p for p in self.state().get("processes", []) if p["name"] == name), None)

    def pid(self, name: str) -> int:
        p = self.process(name)
        if not p or not p.get("pid"):
            raise RuntimeError(f"no process {name!r} in {self.workdir}/up.json")
        return int(p["pid"])

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        pid = self.pid(name)
        os.kill(pid, sig)
        return pid

    def store_metrics_url(self) -> str:
        """The store's /metrics (beside its /healthz in up.json)."""
        store = self.process("store") or {}
        if not store.get("health_url"):
            raise RuntimeError(f"no store with a health_url in {self.workdir}/up.json")
        return str(store["health_url"]).replace("/healthz", "/metrics")

    def close(self) -> None:
        """SIGTERM to both, then up to 30 s each before SIGKILL to its whole group."""
        for p in (self.proc, self.colo):
            p.signal(signal.SIGTERM)
        for p in (self.proc, self.colo):
            p.stop(grace=30.0)
