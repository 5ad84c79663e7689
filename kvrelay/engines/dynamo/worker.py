"""`kvrelay dynamo-worker`: a reference engine registered with NVIDIA Dynamo's runtime, behind
``python -m dynamo.frontend``, its prefill and decode disaggregated through a kvrelay store.

File discovery (``--discovery-dir``, shared by the workers and the frontend) or Dynamo's etcd discovery
(``--etcd URL``: env.py), no NATS; every
listener on 127.0.0.1 (the event plane through `kvrelay dynamo-broker`).  ``--role prefill`` registers a
prefill worker (Dynamo's ``WorkerType.Prefill``), ``--role decode`` a decode worker, ``--role
colocated`` an aggregated one.  The flags are flags.py's; ``--engine-url`` picks remote.py's engine,
else engine.py's runs in-process.  Owns: picking the engine and starting Dynamo's runtime.  Must not
touch: the engines.
"""

from __future__ import annotations

import sys
from typing import Any

from kvrelay.engines.dynamo import flags


def parse(argv: list[str] | None) -> tuple[Any, Any]:
    """(engine, WorkerConfig) for Dynamo's `run`; ValueError naming a bad flag."""
    parsed = flags.parse(argv)
    if parsed.args.engine_url:
        from kvrelay.engines.dynamo.remote import RemoteDynamoEngine
        return RemoteDynamoEngine.from_flags(parsed)
    from kvrelay.engines.dynamo.engine import ReferenceDynamoEngine
    return ReferenceDynamoEngine.from_flags(parsed)


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
