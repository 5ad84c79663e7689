"""`kvrelay bench <suite> [--quick] [--json FILE]`: the suites by name, running them, the command line.

Each suite is a module of this package exposing ``run(ctx: BenchContext)`` (harness.py: the records, the
run context); it is imported by an import statement when it is run, so that one suite's dependencies
(vLLM, NIXL, network namespaces) are never needed by another.  Owns: the suite table and the command
line.  Must not touch: what the suites measure, the record format (harness.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import ModuleType

import msgspec

from kvrelay.bench.harness import BenchContext, Record, format_table

SUITES = ("kernels", "transports", "store", "pd", "vllm", "faults", "router", "router_capacity", "router_routing", "hosts", "atrest", "auth")


def suite_module(name: str) -> ModuleType:
    """The module of suite ``name``; ValueError names the suites."""
    if name == "kernels":
        from kvrelay.bench import kernels
        return kernels
    if name == "transports":
        from kvrelay.bench import transports
        return transports
    if name == "store":
        from kvrelay.bench import store
        return store
    if name == "pd":
        from kvrelay.bench import pd
        return pd
    if name == "vllm":
        from kvrelay.bench import vllm
        return vllm
    if name == "faults":
        from kvrelay.bench import faults
        return faults
    if name == "router":
        from kvrelay.bench import router
        return router
    if name == "router_capacity":  # the capacity case of "router" alone (no engines)
        from kvrelay.bench import router_capacity
        return router_capacity
    if name == "router_routing":  # the routing case of "router" alone (the same cluster, no other case)
        from kvrelay.bench import routing_only
        return routing_only
    if name == "hosts":
        from kvrelay.bench import hosts
        return hosts
    if name == "atrest":
        from kvrelay.bench import atrest
        return atrest
    if name == "auth":
        from kvrelay.bench import auth
        return auth
    raise ValueError(f"unknown benchmark suite {name!r}; choose one of {', '.join(SUITES)}")


def run_suite(name: str, quick: bool = False, progress: bool = True, out_dir: Path | None = None) -> list[Record]:
    module = suite_module(name)
    ctx = BenchContext(suite=name, quick=quick, progress=progress, out_dir=out_dir or Path("bench/results"))
    module.run(ctx)
    return ctx.records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvrelay bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", choices=SUITES + ("all",))
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (CI, smoke runs)")
    parser.add_argument("--json", metavar="FILE", help="write the records as a JSON list to FILE")
    parser.add_argument("--out-dir", default="bench/results", help="where plots and other outputs go")
    parser.add_argument("--no-progress", action="store_true", help="no progress display")
    args = parser.parse_args(argv)
    # "all": router_capacity and router_routing are cases of router, run there
    names = tuple(s for s in SUITES if s not in ("router_capacity", "router_routing")) if args.suite == "all" \
        else (args.suite,)
    records: list[Record] = []
    for name in names:
        records += run_suite(name, quick=args.quick, progress=not args.no_progress, out_dir=Path(args.out_dir))
    print(format_table(records))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_bytes(msgspec.json.format(msgspec.json.encode(records)))
        print(f"wrote {len(records)} records to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
