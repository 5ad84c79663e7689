"""`kvrelay bench router_routing`: the router suite's routing case alone, on the same cluster (no capacity or
overhead case).  A module of its own so that router_routing.py (the case) does not import router.py (the
suite, which imports the case).

Owns: nothing but that entry point.  Must not touch: the case (router_routing.py), the cluster (router.py).
"""

from __future__ import annotations

import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from kvrelay.bench import router
from kvrelay.bench.harness import BenchContext, Record


def run(ctx: BenchContext) -> list[Record]:
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="kvrelay-bench-routing-") as tmp:
        procs = router.Procs(stack, Path(tmp))
        t0 = time.monotonic()
        cl = router.start_cluster(procs, ctx.quick)
        print(f"router bench: cluster up in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        router.routing(ctx, procs, cl)
    return ctx.records
