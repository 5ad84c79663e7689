"""The `kvrelay` command line: dispatches each subcommand to the module that owns it.

Subcommands are imported lazily so `kvrelay --help` stays fast and one broken subsystem cannot stop
the others from starting.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "store": ("kvrelay.store.daemon", "run the store daemon (host-memory pool, SSD tier, prefix cache)"),
    "engine": ("kvrelay.engines.reference.server", "run the reference engine (colocated, prefill or decode)"),
    "router": ("kvrelay.router.server", "run the OpenAI-compatible P/D router over prefill and decode pools"),
    "up": ("kvrelay.launcher", "bring up a local P/D cluster (store, engines) and optionally run a demo"),
    "status": ("kvrelay.status", "show the processes of a running `kvrelay up`: health, restarts, uptime (--etcd "
               "URL: a cluster's members in etcd)"),
    "keys": ("kvrelay.security.keygen", "write a key directory (CURVE keys, shared secret, HTTP token) for --keys"),
    "dynamo-worker": ("kvrelay.engines.dynamo.worker", "run a reference engine as an NVIDIA Dynamo worker (prefill, "
                      "decode or colocated)"),
    "dynamo-frontend": ("kvrelay.engines.dynamo.frontend", "run `python -m dynamo.frontend` on 127.0.0.1 over "
                        "kvrelay's Dynamo workers"),
    "dynamo-broker": ("kvrelay.engines.dynamo.broker", "run the loopback event broker a Dynamo deployment needs"),
    "dynamo-checkpoint": ("kvrelay.engines.dynamo.model_dir", "write a seeded checkpoint ready for Dynamo's frontend"),
    "bench": ("kvrelay.bench.suites", "run a benchmark suite (kernels, transports, store, pd, vllm)"),
}


def usage() -> str:
    lines = ["usage: kvrelay <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'kvrelay <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"kvrelay: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
