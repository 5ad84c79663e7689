"""`kvrelay bench hosts`: tcp, nixl and Mooncake between two network namespaces joined by a veth pair,
beside a raw socket pair across the same veth in the same run.

Owns: the cross-namespace topology of the benchmark (kvrelay/bench/netns.py builds it: the peer in a
namespace of its own, this process in the root namespace, both on one bridge, addresses in 198.18.0.0/15,
removed afterwards) and the records.  The peers, the client ops and the interleaved measurement over repeats
are kvrelay/bench/peers.py's and kvrelay/transfer/bench_peer.py's, bound to the veth's address instead of
loopback.  nixl runs UCX over tcp on the veth (UCX_TLS=tcp,self, UCX_NET_DEVICES=<the veth> on each side),
and so does the bare NIXL agent pair beside it (``nixl-raw``): the two together tell kvrelay's cost from UCX's.
Must not touch: the transports (public API only).

Ratios (each the median over REPEATS interleaved repeats, with their min-max): tcp, authenticated tcp
(``tcp-auth``) and encrypted tcp (``tcp-encrypt``) vs the socket pair, read and write, per size (issue 24's
targets: >= 0.9x at >= 1 MiB, encrypted >= 0.7x); the 4 KiB read round trip of each vs the socket pair's
request/response (tcp's target: <= 1.5x); nixl and nixl-raw vs the socket pair, nixl vs nixl-raw; Mooncake vs
the socket pair and tcp vs Mooncake.  Beside them, in the same run, tcp vs socket on loopback (``tcp-lo``,
``socket-lo``: both ends in this namespace), which tells the transport's own cost from the crossing's.  Needs
root (`ip netns`); without it the suite says why and records nothing.

Then the cluster case (hosts_cluster.py, issue 23): KV bytes per request on each link and P/D throughput, two
prefill hosts feeding one decode host, a store on every host against one central store.  It starts two
four-host clusters (minutes), so ``--quick`` leaves it out (bench/test_bench_hosts_cluster.py runs it quick).
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import ExitStack

from kvrelay.bench import peers
from kvrelay.bench.harness import BenchContext
from kvrelay.bench.peers import KIB, MIB, Op

SIZES_FULL = (4 * KIB, 1 * MIB, 16 * MIB)
SIZES_QUICK = (4 * KIB, 1 * MIB)
REPEATS = 3
TARGET = 0.9  # tcp (and authenticated tcp) vs the socket pair at >= 1 MiB
ENCRYPT_TARGET = 0.7
RTT_TARGET = 1.5
UCX_TLS = "tcp,self"
ACROSS = "veth between network namespaces"
LOOPBACK = "loopback (reference)"


def _kinds(skipped: dict[str, str]) -> list[str]:
    from kvrelay.transfer import available_transports
    usable = available_transports()
    kinds = ["socket", "tcp", "tcp-auth", "tcp-encrypt"]
    if usable.get("nixl", "unknown") is None:
        kinds += ["nixl", "nixl-raw"]
    else:
        skipped["nixl"] = usable.get("nixl") or "unknown"
    why = peers.mooncake_missing()
    if why is None:
        kinds.append("mooncake")
    else:
        skipped["mooncake"] = why
    return kinds


def measure(ctx: BenchContext) -> tuple[dict, dict[str, str]]:
    """results[kind][op][size] = [(GB/s, p50 us, p99 us) of each repeat], the peer across a veth in another
    namespace (``<kind>-lo``: both ends here, on loopback)."""
    from kvrelay import security
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
        keys_dir = str(security.write_keys(os.path.join(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="kvrelay-bench-keys-")), "keys")))
        # this process's NIXL agents read these when they are created (UCX context per agent)
        os.environ.update({"UCX_TLS": UCX_TLS, "UCX_NET_DEVICES": hosts.root_dev})
        stack.callback(_restore, saved)
        peer_env = {"UCX_TLS": UCX_TLS, "UCX_NET_DEVICES": hosts.devices["peer"]}
        prefix = tuple(hosts.command("peer", []))
        ops: dict[str, dict[str, Op]] = {}
        for kind in ctx.steps(kinds, "start peers"):  # one at a time: two NIXL agents starting together can stall
            try:
                child = peers.launch(kind, nbytes, stack, prefix=prefix, host=hosts.address("peer"),
                                     env_extra=peer_env, keys_dir=keys_dir)
                ops[kind] = peers.client_ops(kind, peers.ready(child), nbytes, stack, keys_dir, hosts.root_address)
            except Exception as exc:  # noqa: BLE001 - a kind that cannot run is reported, not fatal
                skipped[kind] = f"{type(exc).__name__}: {exc}"
        for kind in [k for k in ("socket", "tcp") if k in ops]:  # the same pair on loopback, for reference
            try:
                meta = peers.ready(peers.launch(kind, nbytes, stack))
                ops[f"{kind}-lo"] = peers.client_ops(kind, meta, nbytes, stack)
            except Exception as exc:  # noqa: BLE001
                skipped[f"{kind}-lo"] = f"{type(exc).__name__}: {exc}"
        return peers.measure_ops(ctx, ops, sizes, REPEATS, skipped), skipped


def _restore(saved: dict[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _at_least_mib(target: float):
    return lambda n: target if n >= MIB else None


def run(ctx: BenchContext) -> None:
    _transports(ctx)
    if not ctx.quick:
        from kvrelay.bench import hosts_cluster
        hosts_cluster.run(ctx)


def _transports(ctx: BenchContext) -> None:
    results, skipped = measure(ctx)
    for kind, why in skipped.items():
        print(f"hosts: {kind} skipped: {why}", file=sys.stderr)
    if "socket" not in results:
        return
    metrics = ("throughput", "latency_p50")
    for kind, base, across, target_at in (
            ("tcp", "socket", ACROSS, _at_least_mib(TARGET)),
            ("tcp-auth", "socket", ACROSS, _at_least_mib(TARGET)),
            ("tcp-encrypt", "socket", ACROSS, _at_least_mib(ENCRYPT_TARGET)),
            ("nixl", "socket", ACROSS, _at_least_mib(TARGET)),
            ("nixl-raw", "socket", ACROSS, lambda n: None),
            ("nixl", "nixl-raw", ACROSS, lambda n: None),
            ("mooncake", "socket", ACROSS, lambda n: None),
            ("tcp", "mooncake", ACROSS, lambda n: None),
            ("tcp-lo", "socket-lo", LOOPBACK, _at_least_mib(TARGET))):
        if kind in results and base in results:
            peers.add_pair(ctx, results, kind, base, {"across": across}, metrics, target_at=target_at)
    n = min(SIZES_QUICK)
    for kind, base, across in (("tcp", "socket", ACROSS), ("tcp-auth", "socket", ACROSS),
                               ("tcp-encrypt", "socket", ACROSS), ("nixl", "socket", ACROSS),
                               ("mooncake", "socket", ACROSS), ("tcp-lo", "socket-lo", LOOPBACK)):
        if kind in results and base in results:
            peers.add_roundtrip(ctx, results, kind, base, n, RTT_TARGET if kind.startswith("tcp") else None,
                                {"across": across})
