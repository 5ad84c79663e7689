"""`kvrelay dynamo-worker`'s flags: the parser, the checks every worker needs, and Dynamo's
`WorkerConfig` from them.  Importing it does not import Dynamo.

The command (worker.py) and both engines' ``from_args`` (engine.py, remote.py: Dynamo's own entry
point) parse through here, so neither engine imports the command that picks it.

Owns: the flags and their common checks.  Must not touch: the engines.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, NamedTuple

from kvrelay.engines.dynamo import model_dir

DESCRIPTION = ("`kvrelay dynamo-worker`: a reference engine registered with NVIDIA Dynamo's runtime, behind "
               "``python -m dynamo.frontend``, its prefill and decode disaggregated through a kvrelay store.")


class WorkerFlags(NamedTuple):
    args: argparse.Namespace  # the worker's own flags
    rest: list[str]  # the reference engine's flags (`kvrelay engine`'s), for the in-process engine
    name: str  # the model name clients send


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvrelay dynamo-worker", description=DESCRIPTION,
                                epilog="Every other flag is the reference engine's, as `kvrelay engine` takes it "
                                       "(--store, --transport, --block-size, --num-blocks, --chunk-tokens, ...).")
    p.add_argument("--role", choices=("prefill", "decode", "colocated"), required=True)
    p.add_argument("--checkpoint", required=True,
                   help="model directory with tokenizer.json (`kvrelay dynamo-checkpoint DIR` writes a seeded one)")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: --checkpoint)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--discovery-dir", help="Dynamo's file discovery directory (DYN_FILE_KV)")
    where.add_argument("--etcd", metavar="URL", help="Dynamo's etcd discovery instead: http://127.0.0.1:PORT, or "
                                                     "https://HOST:PORT with --keys' etcd certificates")
    p.add_argument("--event-broker", default=os.environ.get("DYN_ZMQ_BROKER_URL", ""),
                   help="DYN_ZMQ_BROKER_URL printed by `kvrelay dynamo-broker` (default: that variable)")
    p.add_argument("--advertise-host", default="127.0.0.1", metavar="ADDR",
                   help="the address Dynamo's request plane binds and advertises (not loopback: only with --keys "
                        "holding `kvrelay keys DIR --etcd-host` certificates: mutual TLS)")
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


def parse(argv: list[str] | None) -> WorkerFlags:
    """The flags, checked as far as every worker needs; ValueError naming a bad flag."""
    args, rest = build_parser().parse_known_args(argv)
    model_dir.check_model_dir(args.checkpoint)
    args.checkpoint = str(Path(args.checkpoint).resolve())
    args.discovery = args.etcd or args.discovery_dir  # env.dynamo_env's: a directory or an etcd URL
    for ep in args.kv_events:
        if not ep.startswith("tcp://127.0.0.1:") and not ep.startswith("ipc://"):
            raise ValueError(f"--kv-events {ep!r}: expected tcp://127.0.0.1:PORT or ipc://PATH (loopback only)")
    return WorkerFlags(args, rest, args.served_model_name or args.checkpoint)


def worker_config(flags: WorkerFlags) -> Any:
    """Dynamo's `WorkerConfig` for these flags (needs ``ai-dynamo``)."""
    from dynamo.common.backend import WorkerConfig

    from kvrelay.engines.dynamo.common import MODES
    args = flags.args
    return WorkerConfig(namespace=args.namespace, component=args.component or f"kvrelay-{args.role}",
                        endpoint="generate", model_name=args.checkpoint, served_model_name=flags.name,
                        discovery_backend="etcd" if args.etcd else "file", request_plane="tcp", event_plane="zmq",
                        disaggregation_mode=MODES[args.role], enable_kv_routing=True)
