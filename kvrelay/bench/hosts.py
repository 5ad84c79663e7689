"""`kvrelay bench hosts`: tcp and nixl throughput between two network namespaces joined by a veth pair,
beside a raw socket pair across the same veth in the same run.

Owns: the cross-namespace topology of the benchmark (kvrelay/bench/netns.py builds it: the peer in a
namespace of its own, this process in the root namespace, both on one bridge, addresses in 198.18.0.0/15,
removed afterwards) and the records.  The peers and the per-size measurement are
kvrelay/bench/transports.py's and kvrelay/transfer/bench_peer.py's, bound to the veth's address instead of
loopback.  nixl runs UCX over tcp on the veth (UCX_TLS=tcp,self, UCX_NET_DEVICES=<the veth> on each side).
Must not touch: the transports (public API only).

Ratios: tcp vs socket and nixl vs socket, read and write, per chunk size; the target is >= 0.9.  Beside
them, in the same run, tcp vs socket on loopback (``tcp-lo``, ``socket-lo``: both ends in this namespace),
which tells the transport's own cost from the crossing's.  Needs root (`ip netns`); without it the suite
says why and records nothing.
"""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack

from kvrelay.bench.harness import BenchContext, Record
from kvrelay.bench.transports import MIB, Op, _launch, _measure_interleaved, _ready, _socket_ops, _transport_ops

SIZES_FULL = (1 * MIB, 4 * MIB, 16 * MIB, 64 * MIB)
SIZES_QUICK = (1 * MIB, 16 * MIB)
TARGET = 0.9
UCX_TLS = "tcp,self"


def _kinds(skipped: dict[str, str]) -> list[str]:
    from kvrelay.transfer import available_transports
    usable = available_transports()
    kinds = ["socket"]
    for name in ("tcp", "nixl"):
        if usable.get(name, "unknown") is None:
            kinds.append(name)
        else:
            skipped[name] = usable.get(name) or "unknown"
    return kinds


def measure(ctx: BenchContext) -> tuple[dict, dict[str, str]]:
    """results[kind][op][size] = (GB/s, p50 us, p99 us), the peer across a veth in another namespace."""
    from kvrelay.bench import netns
    skipped: dict[str, str] = {}
    why = netns.unavailable()
    if why is not None:
        return {}, {"all": f"hosts made of network namespaces: {why}"}
    sizes = SIZES_QUICK if ctx.quick else SIZES_FULL
    nbytes = max(sizes)
    kinds = _kinds(skipped)
    saved = {k: os.environ.get(k) for k in ("UCX_TLS", "UCX_NET_DEVICES")}
    with netns.Hosts(["peer"], tag="b") as hosts, ExitStack() as stack:
        # this process's NIXL agent reads these when it is created (UCX context per agent)
        os.environ.update({"UCX_TLS": UCX_TLS, "UCX_NET_DEVICES": hosts.root_dev})
        stack.callback(_restore, saved)
        peer_env = {"UCX_TLS": UCX_TLS, "UCX_NET_DEVICES": hosts.devices["peer"]}
        prefix = tuple(hosts.command("peer", []))
        ops: dict[str, dict[str, Op]] = {}
        for kind in ctx.steps(kinds, "start peers"):
            try:
                proc = _launch(kind, nbytes, stack, prefix=prefix, host=hosts.address("peer"), env_extra=peer_env)
                meta = _ready(kind, proc)
                ops[kind] = _socket_ops(meta, nbytes, stack) if kind == "socket" else \
                    _transport_ops(kind, meta, nbytes, stack)
            except Exception as exc:  # noqa: BLE001 - a kind that cannot run is reported, not fatal
                skipped[kind] = f"{type(exc).__name__}: {exc}"
        for kind in [k for k in ("socket", "tcp") if k in ops]:  # the same pair on loopback, for reference
            try:
                meta = _ready(kind, _launch(kind, nbytes, stack))
                ops[f"{kind}-lo"] = _socket_ops(meta, nbytes, stack) if kind == "socket" else \
                    _transport_ops(kind, meta, nbytes, stack)
            except Exception as exc:  # noqa: BLE001
                skipped[f"{kind}-lo"] = f"{type(exc).__name__}: {exc}"
        results: dict = {kind: {"read": {}, "write": {}} for kind in ops}
        for op in ("read", "write"):
            for n in ctx.steps(sizes, f"{op} sizes"):
                for kind, r in _measure_interleaved({k: o[op] for k, o in ops.items()}, n, ctx.quick).items():
                    results[kind][op][n] = r
    return results, skipped


def _restore(saved: dict[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def run(ctx: BenchContext) -> None:
    results, skipped = measure(ctx)
    for kind, why in skipped.items():
        print(f"hosts: {kind} skipped: {why}", file=sys.stderr)
    if "socket" not in results:
        return
    for kind, base, across in (("tcp", "socket", "veth between network namespaces"),
                               ("nixl", "socket", "veth between network namespaces"),
                               ("tcp-lo", "socket-lo", "loopback (reference)")):
        if kind not in results or base not in results:
            continue
        for op in ("read", "write"):
            for n, (gbs, p50, _) in results[kind][op].items():
                b_gbs, b_p50, _ = results[base][op][n]
                params = {"transport": kind.split("-")[0], "op": op, "bytes": n, "across": across, "target": TARGET}
                case = f"{kind}/{op}/{n // MIB}MiB"
                ctx.add(Record.compare("hosts", case, "throughput", gbs, "GB/s", base, b_gbs, params))
                ctx.add(Record.compare("hosts", case, "latency_p50", p50, "us", base, b_p50, params, True))
