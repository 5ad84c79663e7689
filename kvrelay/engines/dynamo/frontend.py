"""`kvrelay dynamo-frontend`: ``python -m dynamo.frontend`` on 127.0.0.1 with the environment of a kvrelay
Dynamo deployment (file discovery in ``--discovery-dir`` or etcd discovery at ``--etcd``, the event broker,
loopback listeners).

It only sets that environment and replaces itself with Dynamo's frontend; arguments after ``--`` go
to the frontend unchanged (e.g. ``-- --router-mode kv``).  Owns: nothing but the launch line.  Must not
touch: the frontend.
"""

from __future__ import annotations

import argparse
import os
import sys

from kvrelay.engines.dynamo import env


def command(http_port: int, extra: list[str], backend: str = "file") -> list[str]:
    return [sys.executable, "-m", "dynamo.frontend", "--http-host", env.LOOPBACK, "--http-port", str(http_port),
            "--discovery-backend", backend, "--request-plane", "tcp", "--event-plane", "zmq", *extra]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvrelay dynamo-frontend", description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--discovery-dir", help="the workers' --discovery-dir")
    where.add_argument("--etcd", metavar="URL", help="the workers' --etcd (Dynamo's etcd discovery)")
    p.add_argument("--event-broker", default=os.environ.get("DYN_ZMQ_BROKER_URL", ""),
                   help="DYN_ZMQ_BROKER_URL printed by `kvrelay dynamo-broker` (default: that variable)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--advertise-host", default="127.0.0.1", metavar="ADDR",
                   help="the address its response streams bind (workers on other hosts answer there; not loopback: "
                        "only with --keys holding `kvrelay keys DIR --etcd-host` certificates); HTTP stays on loopback")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="-- then arguments for python -m dynamo.frontend")
    args = p.parse_args(argv)
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    try:
        if not 1 <= args.http_port <= 65535:
            raise ValueError(f"--http-port {args.http_port} is outside 1..65535")
        variables = env.dynamo_env(args.etcd or args.discovery_dir, args.event_broker, host=args.advertise_host)
    except ValueError as exc:
        print(f"kvrelay dynamo-frontend: {exc}", file=sys.stderr)
        return 2
    cmd = command(args.http_port, extra, "etcd" if args.etcd else "file")
    os.execve(sys.executable, cmd, os.environ | variables)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
