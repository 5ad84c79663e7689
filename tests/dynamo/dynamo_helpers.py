"""Helpers of the Dynamo tests (a unique module name: test dirs share sys.path): processes started with
`python -m kvrelay.cli`, free ports, /metrics sums, chat requests through Dynamo's frontend."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[2]
MAX_TOKENS = 12
MODEL = "kvrelay-test"


def free_port(below: int = 65536) -> int:
    """A port free on 127.0.0.1 a moment ago; ``below`` 32768 for Dynamo's status server (an i16 there)."""
    for _ in range(200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 0 if below > 65535 else random.randrange(20000, below)))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError("no free port")


def metric(port: int, name: str) -> float:
    """The sum over label sets of ``name`` on 127.0.0.1:port/metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    pat = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", re.M)
    return sum(float(m.group(2)) for m in pat.finditer(text))


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp, self.procs, self.logs = tmp, [], []
        self.env = os.environ | {"PYTHONPATH": str(ROOT), "KVRELAY_LOG_LEVEL": "WARNING"}

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")
        self.logs.append(log)
        p = subprocess.Popen([sys.executable, "-m", "kvrelay.cli", *args], cwd=ROOT, env=self.env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, p))
        return p

    def tail(self) -> str:
        return "\n".join(f"--- {n}.log\n{(self.tmp / f'{n}.log').read_text(errors='replace')[-1500:]}"
                         for n, _ in self.procs)

    def close(self) -> None:
        for _, p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for _, p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        for log in self.logs:
            log.close()


def wait_pd(c: Cluster, client, pulled) -> None:
    """Until the frontend serves the model through a prefill worker: ``pulled()`` (the decode side's pulled
    bytes) grows after a warm-up request.  Fails at once, with the logs, if a process exits."""
    deadline = time.monotonic() + 240
    while True:
        for name, p in c.procs:
            if p.poll() is not None:
                raise AssertionError(f"{name} exited with {p.returncode}\n{c.tail()}")
        try:
            if any(m.id == MODEL for m in client.models.list().data):
                chat(client, [{"role": "user", "content": "warm up"}], 1)
                if pulled() > 0:
                    return
        except (openai.APIError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"no P/D through the frontend within 240 s\n{c.tail()}")
        time.sleep(1)


def chat(client, messages: list[dict], max_tokens: int = MAX_TOKENS) -> tuple[list[int], dict]:
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                       temperature=0.0,
                                       extra_body={"nvext": {"extra_fields": ["completion_token_ids", "worker_id"]}})
    nvext = (r.model_extra or {}).get("nvext") or {}
    nvext["prompt_tokens"] = r.usage.prompt_tokens if r.usage else None
    return list(nvext["completion_token_ids"]), nvext


