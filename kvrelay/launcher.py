"""`kvrelay up`: bring up a local P/D cluster (store daemon, prefill and decode engines, router).

Owns: starting the processes, waiting for them to be ready (each writes a ready file), tearing them
all down (SIGTERM, then SIGKILL after a grace period) whatever happens, and the `--demo` run.  Must
not touch: what the processes do (see kvrelay/store, kvrelay/engines, kvrelay/router).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvrelay.readyfile import wait_ready_file
from kvrelay.transfer import available_transports


@dataclass
class Proc:
    name: str
    argv: list[str]
    ready_file: Path
    log_path: Path
    popen: subprocess.Popen | None = None
    info: dict = field(default_factory=dict)


class Cluster:
    """A set of child processes that are all stopped when the cluster is closed."""

    def __init__(self, workdir: Path, verbose: bool = False) -> None:
        self.workdir = workdir
        self.verbose = verbose
        self.procs: list[Proc] = []

    def start(self, name: str, args: list[str], timeout: float = 120.0) -> dict:
        ready = self.workdir / f"{name}.ready.json"
        log_path = self.workdir / f"{name}.log"
        ready.unlink(missing_ok=True)  # a ready file left by an earlier run must not pass for this one's
        proc = Proc(name, [sys.executable, "-m", "kvrelay.cli", *args, "--ready-file", str(ready)], ready, log_path)
        out = None if self.verbose else open(log_path, "wb")
        proc.popen = subprocess.Popen(proc.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True)
        if out is not None:
            out.close()
        self.procs.append(proc)
        try:
            proc.info = wait_ready_file(ready, proc.popen, timeout)
        except (ChildProcessError, TimeoutError) as exc:
            raise RuntimeError(f"{name} {exc}; its log: {log_path}\n{_tail(log_path)}") from None
        return proc.info

    def close(self, grace: float = 5.0) -> None:
        for proc in reversed(self.procs):
            if proc.popen and proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in reversed(self.procs):
            if proc.popen is None:
                continue
            try:
                proc.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait()
        self.procs.clear()

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvrelay up", description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", action="store_true",
                   help="send a few requests through the cluster, compare P/D output with a colocated engine, exit")
    p.add_argument("--transport", default="shm", help="data path between the engines and the store (shm, tcp, nixl)")
    p.add_argument("--port", type=int, default=8000, help="router port on 127.0.0.1 (0 picks a free one)")
    p.add_argument("--pool-size", default="1GiB", help="store host-memory pool")
    p.add_argument("--ssd-dir", default="", help="store SSD tier directory (default: none, memory only)")
    p.add_argument("--prefill-block-size", type=int, default=16)
    p.add_argument("--decode-block-size", type=int, default=32,
                   help="the decode side's block size (differs from prefill's to exercise conversion)")
    p.add_argument("--checkpoint", default=None, help="local safetensors checkpoint dir (default: seeded random)")
    p.add_argument("--num-prefill", type=int, default=1)
    p.add_argument("--num-decode", type=int, default=1)
    p.add_argument("--requests", type=int, default=6, help="--demo: number of requests")
    p.add_argument("--workdir", default="", help="where ready files and logs go (default: a temporary dir)")
    p.add_argument("--verbose", action="store_true", help="let the children log to this terminal")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    usable = available_transports()
    if args.transport not in usable:
        print(f"kvrelay up: unknown transport {args.transport!r}; choose one of {', '.join(usable)}", file=sys.stderr)
        return 2
    if usable[args.transport] is not None:
        print(f"kvrelay up: transport {args.transport!r} is not usable here: {usable[args.transport]}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kvrelay-up-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = ["--checkpoint", args.checkpoint] if args.checkpoint else []
    try:
        with Cluster(workdir, verbose=args.verbose) as cluster:
            print(f"kvrelay up: logs in {workdir}", file=sys.stderr)
            store_args = ["store", "--port", "0", "--metrics-port", "0", "--pool-size", args.pool_size,
                          "--pool-name", f"kvrelay-up-{os.getpid()}",
                          "--transports", ",".join(sorted({"shm", args.transport}))]
            if args.ssd_dir:
                store_args += ["--ssd-dir", args.ssd_dir]
            store = cluster.start("store", store_args)
            print(f"  store    {store['address']}  metrics http://127.0.0.1:{store['metrics_port']}/metrics")
            common = [*model, "--port", "0", "--store", store["address"], "--transport", args.transport]
            prefills = [cluster.start(f"prefill{i}", ["engine", "--role", "prefill", *common,
                                                      "--block-size", str(args.prefill_block_size)])
                        for i in range(args.num_prefill)]
            decodes = [cluster.start(f"decode{i}", ["engine", "--role", "decode", *common,
                                                    "--block-size", str(args.decode_block_size)])
                       for i in range(args.num_decode)]
            for kind, infos in (("prefill", prefills), ("decode", decodes)):
                for info in infos:
                    print(f"  {kind:<8} {info['url']}")
            router_args = ["router", "--port", str(0 if args.demo else args.port)]
            for info in prefills:
                router_args += ["--prefill", info["url"]]
            for info in decodes:
                router_args += ["--decode", info["url"]]
            router = cluster.start("router", router_args)
            print(f"  router   {router['url']}  (OpenAI-compatible: /v1/completions, /v1/chat/completions)")
            if args.demo:
                from kvrelay.demo import run_demo
                colocated = cluster.start("colocated", ["engine", "--role", "colocated", *model, "--port", "0"])
                return run_demo(router["url"], colocated["url"], args.requests)
            print("kvrelay up: serving; Ctrl-C stops everything", file=sys.stderr)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
            return 0
    except RuntimeError as exc:
        print(f"kvrelay up: {exc}", file=sys.stderr)
        return 1
