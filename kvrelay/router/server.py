"""`kvrelay router`: the command line of the OpenAI-compatible P/D router (the app: app.py).

It parses the flags into a `RouterConfig` (config.py, which refuses a bad value naming its flag), takes the
keys (``--keys``; a non-loopback ``--host`` needs them), builds the app from the config and serves it on
one port, or starts ``--workers`` router processes sharing it (workers.py).  A refused flag, or a port
that cannot be bound, is one line on stderr and exit code 2.

Owns: the flags, turning them into a config, and serving.  Must not touch: routing (app.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import socket
from typing import Awaitable, Callable

from kvrelay import security
from kvrelay.membership import Member, register_when_bound
from kvrelay.router.app import Router
from kvrelay.router.config import RouterConfig
from kvrelay.router.policy import POLICIES
from kvrelay.router.workers import run_workers
from kvrelay.security import check_loopback
from kvrelay.serving import serve_until_signal

log = logging.getLogger("kvrelay.router")

__all__ = ["Router", "build_parser", "config_of", "main"]
DESCRIPTION = "`kvrelay router`: an OpenAI-compatible proxy that runs each request as a prefill leg and a decode leg."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvrelay router", description=DESCRIPTION)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--prefill", action="append", default=[], metavar="URL", help="a prefill worker (repeatable)")
    p.add_argument("--decode", action="append", default=[], metavar="URL", help="a decode worker (repeatable)")
    p.add_argument("--policy", choices=POLICIES, default="least_loaded")
    p.add_argument("--store", default="", metavar="ADDR",
                   help="the store's control address (tcp://127.0.0.1:PORT, as given to the engines): while it does "
                        "not answer pings, requests go to a decode worker alone")
    p.add_argument("--prefill-store", action="append", default=[], metavar="URL=ADDR",
                   help="a store on every host: the store the --prefill worker URL publishes into (repeatable, one "
                        "for every --prefill); its decode legs name it, and while it does not answer pings "
                        "requests go to the other prefill workers")
    p.add_argument("--health-interval", type=float, default=2.0, help="seconds between health checks of every worker")
    p.add_argument("--probe-interval", type=float, default=0.2,
                   help="seconds between probes of a worker (or the store) out of service")
    p.add_argument("--retries", type=int, default=5, help="attempts of a failed leg after the first")
    p.add_argument("--retry-backoff", type=float, default=0.05,
                   help="seconds: the first retry waits a random time below this; each next one below twice as much")
    p.add_argument("--retry-backoff-max", type=float, default=1.0, help="seconds: the longest wait between retries")
    p.add_argument("--breaker-failures", type=int, default=10,
                   help="consecutive failed requests that take a worker out of service (a refused or reset "
                        "connection does at once)")
    p.add_argument("--prefill-connections", type=int, default=1000,
                   help="most open connections to the prefill workers together (0: no limit)")
    p.add_argument("--decode-connections", type=int, default=1000,
                   help="most open connections to the decode workers together, hence most streams at once (0: no "
                        "limit)")
    p.add_argument("--prefill-drain", type=float, default=30.0,
                   help="seconds a prefill leg may run on after its decode was answered, so that its connection is "
                        "kept; then it is cancelled (0: at once)")
    p.add_argument("--events", action="append", default=[], metavar="NAME=PUB[,REPLAY]",
                   help="follow the KV events of a worker (NAME: its --prefill/--decode URL) or of the store "
                        "(NAME: store) at the ZMQ publisher PUB and its replay socket REPLAY (repeatable); "
                        "cache_aware routing and the decode-only rules read them")
    p.add_argument("--tokenizer", default="", metavar="DIR",
                   help="the checkpoint whose tokenizer.json the engines use, to hash text prompts as they do "
                        "(default: byte-level, the reference engine's without one; token-id prompts need none)")
    p.add_argument("--overlap-weight", type=float, default=1.0,
                   help="cache_aware: weight of the prompt tokens left to compute against queued tokens")
    p.add_argument("--balance-abs", type=int, default=4, metavar="REQUESTS",
                   help="cache_aware: a worker with this many more requests in flight than the idlest one (and "
                        "--balance-rel times as many) is passed over, however much of the prompt it holds (0: no "
                        "guard; herding onto a hot prefix's holder is then bounded by the cost alone)")
    p.add_argument("--balance-rel", type=float, default=1.5, metavar="RATIO",
                   help="cache_aware: ... and this many times as many requests in flight as the idlest one")
    p.add_argument("--route-temperature", type=float, default=0.0,
                   help="cache_aware: 0 picks the worker of least cost; above 0 draws among the eligible workers by "
                        "a softmax of their normalized costs (Dynamo's router_temperature)")
    p.add_argument("--request-tokens", type=int, default=32, metavar="TOKENS",
                   help="cache_aware: a request's fixed cost on an engine, in prompt tokens (its load counts "
                        "tokens held plus this per request)")
    p.add_argument("--engine-load", action="store_true",
                   help="cache_aware: the health probe also reads each engine's /metrics for the requests other "
                        "clients sent it (other --workers processes, other routers), lagged by --health-interval; "
                        "off by default: a reading taken during another client's burst misleads until the next")
    p.add_argument("--decode-only-below", type=int, default=0, metavar="TOKENS",
                   help="prompts shorter than this go to a decode worker alone (0: off)")
    p.add_argument("--decode-only-hit", type=float, default=0.8, metavar="FRACTION",
                   help="a prompt whose prefix a decode worker holds for at least this fraction (tier-weighted) "
                        "goes to it alone (above 1: off; needs --events of the decode workers)")
    p.add_argument("--store-skip", action="store_true",
                   help="no prefill leg when the store's events show it holds the whole prompt, under the request's "
                        "own cache_salt (the decode pulls it); off by default: the store may evict the prompt "
                        "between its event and the pull, and the decode then waits out its pull deadline")
    p.add_argument("--etcd", default="", metavar="URL",
                   help="also route to the prefill and decode workers registered in this etcd (http://HOST:PORT): "
                        "a worker joins within a few seconds of registering and leaves when its lease ends")
    p.add_argument("--cluster", default="default", help="with --etcd: the cluster whose members to follow")
    p.add_argument("--workers", type=int, default=1,
                   help="router processes sharing the port (SO_REUSEPORT), for more than one core; each keeps its "
                        "own pools, breakers, KV index and metrics")
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # a --workers child
    p.add_argument("--ready-file", default="")
    p.add_argument("--log-level", default=os.environ.get("KVRELAY_LOG_LEVEL", "INFO"))
    security.add_argument(p)
    return p


def config_of(args: argparse.Namespace) -> RouterConfig:
    """The config the parsed flags give; ValueError names a bad flag."""
    return RouterConfig(decode=tuple(args.decode), prefill=tuple(args.prefill), host=args.host, port=args.port,
                        policy=args.policy, store=args.store, prefill_stores=tuple(args.prefill_store),
                        health_interval=args.health_interval,
                        probe_interval=args.probe_interval, retries=args.retries, retry_backoff=args.retry_backoff,
                        retry_backoff_max=args.retry_backoff_max, breaker_failures=args.breaker_failures,
                        prefill_connections=args.prefill_connections, decode_connections=args.decode_connections,
                        prefill_drain=args.prefill_drain, events=tuple(args.events), tokenizer=args.tokenizer,
                        overlap_weight=args.overlap_weight, balance_abs=args.balance_abs,
                        balance_rel=args.balance_rel, route_temperature=args.route_temperature,
                        request_tokens=args.request_tokens, engine_load=args.engine_load,
                        decode_only_below=args.decode_only_below,
                        decode_only_hit=args.decode_only_hit, store_skip=args.store_skip, workers=args.workers,
                        reuse_port=args.reuse_port, ready_file=args.ready_file, log_level=args.log_level,
                        etcd=args.etcd, cluster=args.cluster)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when it is installed (about half the router's CPU per relayed request), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _registrar(config: RouterConfig) -> Callable[[int], Awaitable[Callable[[], Awaitable[None]]]] | None:
    """With --etcd the router registers itself (kind router) once bound, so `kvrelay status --etcd` lists it;
    a --workers child's name carries its pid (the children share one port)."""
    if not config.etcd:
        return None

    def member_at(port: int) -> Member:
        name = f"router-{socket.gethostname()}-{port}" + (f"-{os.getpid()}" if config.reuse_port else "")
        return Member(kind="router", name=name, address=f"http://{config.host}:{port}", cluster=config.cluster,
                      attributes={"policy": config.policy})
    return register_when_bound(config.etcd, member_at, ttl=10)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_of(args)
        security.configure(args.keys)
        check_loopback(config.host, "router")  # another address only with keys
        logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
        router = Router.from_config(config)
    except ValueError as exc:
        print(f"kvrelay router: {exc}", file=sys.stderr)
        return 2
    if config.workers > 1:
        return run_workers(list(argv if argv is not None else sys.argv[1:]), config.host, config.port,
                           config.workers, config.ready_file)
    name = f"kvrelay router ({len(config.prefill)} prefill, {len(config.decode)} decode)"

    async def serve() -> None:
        try:
            await serve_until_signal(router.app, config.host, config.port, config.ready_file, name, log,
                                     reuse_port=config.reuse_port, bound=_registrar(config))
        except OSError:  # the app had started (its session, its probes) before the bind failed: close them
            await router.app.cleanup()
            raise

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve())
    except OSError as exc:  # the port is taken, or the ready file cannot be written
        print(f"kvrelay router: cannot serve on --host {config.host} --port {config.port}: {exc}", file=sys.stderr)
        return 2
    return 0
