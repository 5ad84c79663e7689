"""`kvrelay dynamo-worker`: a reference engine registered with NVIDIA Dynamo's runtime, behind
``python -m dynamo.frontend``, its prefill and decode disaggregated through a kvrelay store.

File discovery (``--discovery-dir``, shared by the workers and the frontend), no etcd, no NATS; every
listener on 127.0.0.1 (the event plane through `kvrelay dynamo-broker`).  ``--role prefill`` registers a
prefill worker (Dynamo's ``WorkerType.Prefill``), ``--role decode`` a decode worker, ``--role
colocated`` an aggregated one.  Owns: flags, environment and wiring.  Must not touch: the engine.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

from kvrelay.engines.dynamo import env, model_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvrelay dynamo-worker", description=__doc__.split("\n\n")[0],
                                epilog="Every other flag is the reference engine's, as `kvrelay engine` takes it "
                                       "(--store, --transport, --block-size, --num-blocks, --chunk-tokens, ...).")
    p.add_argument("--role", choices=("prefill", "decode", "colocated"), required=True)
    p.add_argument("--checkpoint", required=True,
                   help="model directory with tokenizer.json (`kvrelay dynamo-checkpoint DIR` writes a seeded one)")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: --checkpoint)")
    p.add_argument("--discovery-dir", required=True, help="Dynamo's file discovery directory (DYN_FILE_KV)")
    p.add_argument("--event-broker", default=os.environ.get("DYN_ZMQ_BROKER_URL", ""),
                   help="DYN_ZMQ_BROKER_URL printed by `kvrelay dynamo-broker` (default: that variable)")
    p.add_argument("--namespace", default="dynamo")
    p.add_argument("--component", default=None, help="Dynamo component (default: kvrelay-ROLE)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve /metrics (kvrelay_engine_* and Dynamo's) and /health on 127.0.0.1:PORT")
    p.add_argument("--engine-url", default="",
                   help="forward to this kvrelay-backed OpenAI server (vLLM with KVRelayConnector, or a `kvrelay "
                        "engine`), http://127.0.0.1:PORT, instead of running a reference engine in-process")
    p.add_argument("--kv-events", action="append", default=[], metavar="ZMQ_ENDPOINT",
                   help="a KV-event publisher (vLLM's wire format) for Dynamo's KV router, e.g. the store's")
    return p


def parse(argv: list[str] | None) -> tuple[Any, Any]:
    """(engine, WorkerConfig) for Dynamo's `run`; ValueError naming a bad flag."""
    from kvrelay.engines.dynamo.engine import ReferenceDynamoEngine
    from kvrelay.engines.reference.server import build_engine, check_args
    from kvrelay.engines.reference.server import build_parser as engine_parser

    args, rest = build_parser().parse_known_args(argv)
    model_dir.check_model_dir(args.checkpoint)
    args.checkpoint = str(Path(args.checkpoint).resolve())
    for ep in args.kv_events:
        if not ep.startswith("tcp://127.0.0.1:") and not ep.startswith("ipc://"):
            raise ValueError(f"--kv-events {ep!r}: expected tcp://127.0.0.1:PORT or ipc://PATH (loopback only)")
    name = args.served_model_name or args.checkpoint
    if args.engine_url:
        return _remote(args, rest, name)
    # the reference engine's own flags, exactly as `kvrelay engine` takes them
    try:
        eng = engine_parser().parse_args(["--role", args.role, "--checkpoint", args.checkpoint, "--port", "0", *rest])
    except SystemExit as exc:
        raise ValueError(f"bad engine flags {' '.join(rest)!r} (see `kvrelay engine --help`)") from exc
    if args.role != "colocated" and not eng.store:
        raise ValueError(f"--role {args.role} needs --store tcp://127.0.0.1:PORT (a running `kvrelay store`)")
    check_args(eng)
    env.apply(env.dynamo_env(args.discovery_dir, args.event_broker, args.metrics_port))
    if eng.threads > 0:
        import torch
        torch.set_num_threads(eng.threads)
    engine = ReferenceDynamoEngine(eng, build_engine, model_dir.stop_token_ids(args.checkpoint), args.kv_events, name)
    return engine, worker_config(args, name)


def worker_config(args: argparse.Namespace, name: str) -> Any:
    from dynamo.common.backend import WorkerConfig

    from kvrelay.engines.dynamo.engine import MODES
    return WorkerConfig(namespace=args.namespace, component=args.component or f"kvrelay-{args.role}",
                        endpoint="generate", model_name=args.checkpoint, served_model_name=name,
                        discovery_backend="file", request_plane="tcp", event_plane="zmq",
                        disaggregation_mode=MODES[args.role], enable_kv_routing=True)


def _remote(args: argparse.Namespace, rest: list[str], name: str) -> tuple[Any, Any]:
    from kvrelay.engines.dynamo.remote import RemoteDynamoEngine
    if rest:
        raise ValueError(f"--engine-url forwards to a running server: engine flags {' '.join(rest)!r} belong to "
                         "that server's own command line")
    if not re.fullmatch(r"http://127\.0\.0\.1:\d{1,5}/?", args.engine_url):
        raise ValueError(f"--engine-url {args.engine_url!r} is not http://127.0.0.1:PORT (loopback only)")
    env.apply(env.dynamo_env(args.discovery_dir, args.event_broker, args.metrics_port))
    engine = RemoteDynamoEngine(args.engine_url, args.role, args.checkpoint, name,
                                model_dir.stop_token_ids(args.checkpoint), args.kv_events, max_model_len=4096)
    return engine, worker_config(args, name)


def main(argv: list[str] | None = None) -> int:
    try:
        from dynamo.common.backend.run import run
    except ImportError as exc:
        print(f"kvrelay dynamo-worker: NVIDIA Dynamo is not installed ({exc}); install it with "
              "`pip install ai-dynamo-runtime==1.6.1 && pip install --no-deps ai-dynamo==1.6.1`", file=sys.stderr)
        return 2
    from kvrelay.engines.dynamo.engine import ReferenceDynamoEngine
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parsed = parse(argv)  # flags checked here, before Dynamo's runtime starts: one line and exit 2
    except ValueError as exc:
        print(f"kvrelay dynamo-worker: {exc}", file=sys.stderr)
        return 2

    async def factory(_argv: list[str] | None) -> Any:
        return parsed

    run(ReferenceDynamoEngine, argv, engine_factory=factory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
