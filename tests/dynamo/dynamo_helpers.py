"""Helpers of the Dynamo tests (a unique module name: test dirs share sys.path): processes started with
`python -m kvrelay.cli`, free ports, /metrics sums, chat requests through Dynamo's frontend."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import openai

from kvrelay import proc
from kvrelay.engines.dynamo.model_dir import add_byte_tokenizer
from kvrelay.engines.reference.config import ModelConfig
from kvrelay.engines.reference.weights import write_random_checkpoint
from waiting import wait_until

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
    """The test's processes, each spawned by kvrelay.proc in its own process group (Dynamo's workers start
    children), its log in ``tmp/NAME.log``; ``procs``: (name, Popen) in spawn order."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.children: list[proc.ChildProcess] = []
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.env = os.environ | {"PYTHONPATH": str(ROOT), "KVRELAY_LOG_LEVEL": "WARNING"}

    def spawn(self, name: str, *args: str, ready_file: Path | None = None) -> proc.ChildProcess:
        """``kvrelay ARGS`` (with ``--ready-file`` when ``ready_file`` is given: ``.wait_ready(timeout)``)."""
        child = proc.spawn_kvrelay(list(args), name=name, log=self.tmp / f"{name}.log", log_mode="ab", env=self.env,
                                   cwd=ROOT, session=True, ready_file=ready_file)
        self.children.append(child)
        self.procs.append((name, child.popen))
        return child

    def tail(self) -> str:
        return "\n".join(f"--- {n}.log\n{(self.tmp / f'{n}.log').read_text(errors='replace')[-1500:]}"
                         for n, _ in self.procs)

    def close(self) -> None:
        """SIGTERM to every group, then up to 30 s in all for them to exit; SIGKILL to the groups left."""
        for child in self.children:
            if child.alive():
                child.signal(signal.SIGTERM, group=True)
        deadline = time.monotonic() + 30
        for child in self.children:
            child.stop(max(0.1, deadline - time.monotonic()), group=True)


def pd_checkpoint(path: Path, model_id: str) -> Path:
    """A seeded 4-layer checkpoint (std 0.2: its KV moves the greedy tokens) with a byte tokenizer, at ``path``."""
    cfg = ModelConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=4, num_heads=4,
                      num_kv_heads=2, head_dim=64, init_std=0.2, seed=7, model_id=model_id)
    return add_byte_tokenizer(write_random_checkpoint(path, cfg))


def spawn_pd(c: Cluster, ck: Path, disc: Path, broker_url: str, store_address: str, ports: dict[str, int],
             *extra: str) -> openai.OpenAI:
    """A prefill and a decode `kvrelay dynamo-worker` (their metrics on ``ports[role]``, ``extra`` flags) and
    Dynamo's frontend on ``ports["http"]``; its client (not waited for: see `wait_pd`)."""
    common = ["--checkpoint", str(ck), "--served-model-name", MODEL, "--discovery-dir", str(disc),
              "--event-broker", broker_url, "--store", store_address, "--threads", "1", *extra]
    for role in ("prefill", "decode"):
        c.spawn(role, "dynamo-worker", "--role", role, "--metrics-port", str(ports[role]), *common)
    c.spawn("frontend", "dynamo-frontend", "--discovery-dir", str(disc), "--event-broker", broker_url,
            "--http-port", str(ports["http"]))
    return openai.OpenAI(base_url=f"http://127.0.0.1:{ports['http']}/v1", api_key="none", timeout=120,
                         max_retries=0)


def wait_pd(c: Cluster, client, pulled) -> None:
    """Until the frontend serves the model through a prefill worker: ``pulled()`` (the decode side's pulled
    bytes) grows after a warm-up request.  Fails at once, with the logs, if a process exits."""
    def served() -> bool:
        for name, p in c.procs:
            if p.poll() is not None:
                raise AssertionError(f"{name} exited with {p.returncode}\n{c.tail()}")
        try:
            if any(m.id == MODEL for m in client.models.list().data):
                chat(client, [{"role": "user", "content": "warm up"}], 1)
                return pulled() > 0
        except (openai.APIError, OSError):
            pass
        return False
    wait_until(served, 240, "P/D through the frontend", detail=c.tail, interval=0.5)


def chat(client, messages: list[dict], max_tokens: int = MAX_TOKENS) -> tuple[list[int], dict]:
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                       temperature=0.0,
                                       extra_body={"nvext": {"extra_fields": ["completion_token_ids", "worker_id",
                                                                  "timing"]}})
    nvext = (r.model_extra or {}).get("nvext") or {}
    nvext["prompt_tokens"] = r.usage.prompt_tokens if r.usage else None
    return list(nvext["completion_token_ids"]), nvext


