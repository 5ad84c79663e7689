"""The two ends of a transfer benchmark: peer processes, the client ops that drive them, and the timing.

Owns: starting a bench peer (kvrelay/transfer/bench_peer.py, one process per kind, optionally inside a network
namespace), the client side of each kind as an ``Op`` (one transfer of n bytes: a kvrelay endpoint, tcp with
keys (``tcp-auth``, ``tcp-encrypt``), a raw socket pair, pyzmq, a bare NIXL agent, Mooncake's transfer engine
over TCP), the interleaved timing of several kinds over repeats, and the records that set a kind beside its
baseline with the spread over repeats.  `kvrelay bench transports` (loopback), `hosts` (across a veth) and
`auth` use it.  Must not touch: the transports (public API only), what a suite reports.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from contextlib import ExitStack
from typing import Callable

import numpy as np

from kvrelay import proc
from kvrelay.bench.harness import BenchContext, Record, median, percentile

KIB, MIB = 1 << 10, 1 << 20
Op = Callable[[int], None]
Sample = tuple[float, float, float]  # (GB/s from the median transfer, p50 us, p99 us) of one repeat
ENDPOINT_KINDS = ("shm", "tcp", "nixl", "tcp-auth", "tcp-encrypt")  # kvrelay endpoints; the rest are raw
KEYED_KINDS = ("tcp-auth", "tcp-encrypt")  # need the keys directory on both sides


def launch(kind: str, nbytes: int, stack: ExitStack, prefix: tuple[str, ...] = (), host: str = "127.0.0.1",
           env_extra: dict[str, str] | None = None, keys_dir: str = "") -> proc.ChildProcess:
    """The bench peer of ``kind``, bound to ``host``, run under ``prefix`` (e.g. ``ip netns exec NS``); stopped
    with ``stack`` (its stdin closed: the peer closes its endpoint and exits; killed after 5 s)."""
    if kind in KEYED_KINDS and not keys_dir:
        raise ValueError(f"bench peer {kind!r} needs keys_dir (a directory written by security.write_keys)")
    env = {"NIXL_LOG_LEVEL": "WARNING", **os.environ, **(env_extra or {})}  # NIXL logs to stdout, unread after start
    argv = [*prefix, sys.executable, "-m", "kvrelay.transfer.bench_peer", kind, str(nbytes), host]
    child = proc.spawn(argv + ([keys_dir] if kind in KEYED_KINDS else []), name=f"bench peer {kind}",
                       log=proc.DISCARD, pipes=True, env=env)
    stack.callback(child.close_pipes)
    stack.callback(child.stop, 5.0, sig=None)
    return child


def ready(child: proc.ChildProcess, timeout: float = 300.0) -> dict:
    """The peer's JSON line (its address and region); TimeoutError or RuntimeError if it does not come."""
    return child.read_json_line(timeout)


def client_ops(kind: str, meta: dict, nbytes: int, stack: ExitStack, keys_dir: str = "",
               local_host: str = "127.0.0.1") -> dict[str, Op]:
    """Read and write ops of this process on the peer ``kind`` described by ``meta`` (closed with ``stack``)."""
    if kind in ENDPOINT_KINDS:
        return transport_ops(kind, meta, nbytes, stack, keys_dir)
    if kind == "mooncake":
        return mooncake_ops(meta, nbytes, stack, local_host)
    makers = {"socket": socket_ops, "zmq": zmq_ops, "nixl-raw": nixl_raw_ops}
    if kind not in makers:
        raise ValueError(f"unknown bench kind {kind!r}")
    return makers[kind](meta, nbytes, stack)


def transport_ops(kind: str, meta: dict, nbytes: int, stack: ExitStack, keys_dir: str = "") -> dict[str, Op]:
    from kvrelay import security
    from kvrelay.transfer import create_transport
    name, _, mode = kind.partition("-")
    with security.using(security.load(keys_dir) if mode else None):  # the peer's meta says whether to encrypt
        ep = create_transport(name, f"bench-{kind}-client", "bench")
    return endpoint_ops(ep, meta, nbytes, stack)


def endpoint_ops(ep, meta: dict, nbytes: int, stack: ExitStack) -> dict[str, Op]:
    """Read and write ops of ``ep`` (a client endpoint, closed with ``stack``) on the peer of ``meta``."""
    from kvrelay.transfer.base import Desc
    stack.callback(ep.close)
    info, _ = ep.alloc(nbytes)
    peer = ep.connect(meta["address"], timeout=30)

    def make(op: str) -> Op:
        fn = ep.read if op == "read" else ep.write

        def run(n: int) -> None:
            with fn(peer, [Desc(info.region_id, 0, meta["region"], 0, n)], timeout=60) as h:
                h.result()
        return run
    return {"read": make("read"), "write": make("write")}


def socket_ops(meta: dict, nbytes: int, stack: ExitStack) -> dict[str, Op]:
    """A raw socket pair: a read is a 9-byte request answered by n bytes (at 4 KiB: the request/response round
    trip the tcp transport's small reads are held against); a write is n bytes answered by one."""
    from kvrelay.transfer.bench_peer import _REQ
    sock = socket.create_connection((meta.get("host", "127.0.0.1"), meta["port"]))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stack.callback(sock.close)
    mv = np.zeros(nbytes, np.uint8).data  # a memoryview (typed as one, unlike memoryview(array) before 3.12)
    ack = bytearray(1)

    def read(n: int) -> None:
        sock.sendall(_REQ.pack(b"r", n))
        got = 0
        while got < n:
            k = sock.recv_into(mv[got:n])
            if not k:
                raise ConnectionError("the socket peer closed the connection")
            got += k

    def write(n: int) -> None:
        sock.sendall(_REQ.pack(b"w", n))
        sock.sendall(mv[:n])
        if not sock.recv_into(ack, 1):
            raise ConnectionError("the socket peer closed the connection")
    return {"read": read, "write": write}


def zmq_ops(meta: dict, nbytes: int, stack: ExitStack) -> dict[str, Op]:
    import zmq

    from kvrelay.transfer.bench_peer import _REQ, RAW_FRAME
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{meta['port']}")
    stack.callback(ctx.term)
    stack.callback(sock.close)
    mv = np.zeros(nbytes, np.uint8).data  # a memoryview (typed as one, unlike memoryview(array) before 3.12)

    def read(n: int) -> None:
        sock.send(_REQ.pack(b"r", n))
        off = sock.recv_into(mv[0:RAW_FRAME])
        while sock.getsockopt(zmq.RCVMORE):
            off += sock.recv_into(mv[off:off + RAW_FRAME])

    def write(n: int) -> None:
        sock.send(_REQ.pack(b"w", n), zmq.SNDMORE)
        offs = list(range(0, n, RAW_FRAME))
        for i, off in enumerate(offs):
            part = mv[off:min(n, off + RAW_FRAME)]
            sock.send(part, zmq.SNDMORE if i < len(offs) - 1 else 0, copy=part.nbytes < 65536)
        sock.recv()
    return {"read": read, "write": write}


def nixl_raw_ops(meta: dict, nbytes: int, stack: ExitStack) -> dict[str, Op]:
    """A bare NIXL agent (made as kvrelay's: UCX, progress thread at 1 ms): one prepared transfer per call,
    its state polled in a busy loop until done."""
    from kvrelay.transfer.nixl_transport import make_agent
    agent = make_agent("bench-raw-initiator", 1000)
    agent.create_backend("UCX", {"ucx_error_handling_mode": "peer"})
    buf = np.zeros(nbytes, np.uint8)
    agent.register_memory([(buf.ctypes.data, nbytes, 0, "")], "DRAM")
    remote = agent.add_remote_agent(bytes.fromhex(meta["meta"]))
    remote = remote.decode() if isinstance(remote, bytes) else remote
    stack.callback(lambda: agent.remove_remote_agent(remote))

    def make(op: str) -> Op:
        def run(n: int) -> None:
            h = agent.initialize_xfer(op.upper(), agent.get_xfer_descs([(buf.ctypes.data, n, 0)], "DRAM"),
                                      agent.get_xfer_descs([(meta["address"], n, 0)], "DRAM"), remote)
            state = agent.transfer(h)
            while state == "PROC":
                state = agent.check_xfer_state(h)
            h.release()
            if state != "DONE":
                raise RuntimeError(f"raw NIXL {op} failed")
        return run
    return {"read": make("read"), "write": make("write")}


def mooncake_ops(meta: dict, nbytes: int, stack: ExitStack, local_host: str = "127.0.0.1") -> dict[str, Op]:
    """Mooncake's transfer engine over TCP (P2P handshake, no metadata server), synchronous reads and writes."""
    from mooncake.engine import TransferEngine
    te = TransferEngine()
    if te.initialize(local_host, "P2PHANDSHAKE", "tcp", "") != 0:
        raise RuntimeError(f"mooncake TransferEngine.initialize({local_host!r}, P2PHANDSHAKE, tcp) failed")
    buf = np.zeros(nbytes, np.uint8)
    if te.register_memory(buf.ctypes.data, nbytes) != 0:
        raise RuntimeError("mooncake register_memory failed")
    stack.callback(lambda: te.unregister_memory(buf.ctypes.data))

    def read(n: int) -> None:
        if te.transfer_sync_read(meta["target"], buf.ctypes.data, meta["address"], n) != 0:
            raise RuntimeError("mooncake read failed")

    def write(n: int) -> None:
        if te.transfer_sync_write(meta["target"], buf.ctypes.data, meta["address"], n) != 0:
            raise RuntimeError("mooncake write failed")
    return {"read": read, "write": write}


def mooncake_missing() -> str | None:
    """Why Mooncake's transfer engine cannot be used here (None: it can)."""
    try:
        import mooncake.engine  # noqa: F401  (availability probe)
    except Exception as exc:  # noqa: BLE001 - missing package or its native libraries
        return (f"mooncake transfer engine not importable ({exc}); pip install mooncake-transfer-engine-non-cuda "
                f"and apt-get install libibverbs1")
    return None


def reps(n: int, quick: bool) -> int:
    """Transfers of n bytes per kind in one repeat."""
    if n <= 64 * KIB:
        return 60 if quick else 200
    budget = (24 if quick else 192) * MIB
    return int(min(100, max(4 if quick else 8, budget // n)))


def warm_up(ops: dict[str, Op], n: int, skipped: dict[str, str]) -> dict[str, Op]:
    """``ops`` less the kinds whose first transfer of n bytes fails (each named in ``skipped`` with why): a kind
    that cannot run is reported, and the others are still measured."""
    usable = {}
    for kind, fn in ops.items():
        try:
            fn(n)
        except Exception as exc:  # noqa: BLE001 - reported in the suite's output
            skipped[kind] = f"its first {n}-byte transfer failed: {type(exc).__name__}: {exc}"
        else:
            usable[kind] = fn
    return usable


def measure_interleaved(ops: dict[str, Op], n: int, quick: bool, count: int | None = None) -> dict[str, Sample]:
    """Per kind: (GB/s from the median, p50 us, p99 us) of ``count`` single transfers of n bytes after one
    warm-up transfer.  The kinds take turns transfer by transfer, so load from other processes on the host hits
    every kind alike and the ratios stay meaningful on a shared machine."""
    for fn in ops.values():
        fn(n)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in ops}
    for _ in range(reps(n, quick) if count is None else count):
        for kind, fn in ops.items():
            t0 = time.perf_counter()
            fn(n)
            times[kind].append(time.perf_counter() - t0)
    return {k: (n / median(t) / 1e9, percentile(t, 50) * 1e6, percentile(t, 99) * 1e6) for k, t in times.items()}


def measure_ops(ctx: BenchContext, ops: dict[str, dict[str, Op]], sizes: tuple[int, ...], repeats: int,
                skipped: dict[str, str]) -> dict[str, dict[str, dict[int, list[Sample]]]]:
    """results[kind][op][size] = [the sample of each repeat]: every kind interleaved with every other, ``repeats``
    times (repeat i of every kind measured together, so the per-repeat ratios pair up).  A kind whose first
    transfer fails is dropped and named in ``skipped``."""
    for op in ("read", "write"):
        for kind in set(ops) - set(warm_up({k: o[op] for k, o in ops.items()}, min(sizes), skipped)):
            del ops[kind]
    results: dict = {kind: {"read": {}, "write": {}} for kind in ops}
    for op in ("read", "write"):
        for n in ctx.steps(sizes, f"{op} sizes"):
            for _ in range(repeats):
                for kind, sample in measure_interleaved({k: o[op] for k, o in ops.items()}, n, ctx.quick).items():
                    results[kind][op].setdefault(n, []).append(sample)
    return results


def size_name(n: int) -> str:
    return f"{n // MIB}MiB" if n >= MIB and n % MIB == 0 else f"{n // KIB}KiB"


def add_pair(ctx: BenchContext, results: dict, kind: str, base: str, params: dict,
             metrics: tuple[str, ...] = ("throughput", "latency_p50", "latency_p99"), case_kind: str | None = None,
             target_at: Callable[[int], float | None] = lambda n: None) -> None:
    """Records of ``kind`` beside ``base`` for every op and size both have, with the spread over repeats;
    ``target_at(n)`` is the throughput ratio the issue asks for at size n (None: no target there)."""
    field = {"throughput": 0, "latency_p50": 1, "latency_p99": 2}
    for op in ("read", "write"):
        for n, samples in results[kind][op].items():
            base_samples = results[base][op][n]
            case = f"{case_kind or kind}/{op}/{size_name(n)}"
            p = {**params, "transport": kind, "op": op, "bytes": n}
            target = target_at(n)
            for metric in metrics:
                i = field[metric]
                rec = Record.compare_repeats(ctx.suite, case, metric, [s[i] for s in samples],
                                             "GB/s" if i == 0 else "us", base, [s[i] for s in base_samples],
                                             {**p, **({"target": target} if target is not None and i < 2 else {})},
                                             lower_is_better=i > 0)
                ctx.add(rec)


def add_roundtrip(ctx: BenchContext, results: dict, kind: str, base: str, n: int, target: float | None,
                  params: dict) -> None:
    """The p50 round trip of an n-byte read of ``kind`` against ``base``'s (ratio = base/kind: >= 1/target means
    within ``target`` times the baseline's round trip)."""
    if n not in results[kind]["read"] or n not in results[base]["read"]:
        return
    ctx.add(Record.compare_repeats(
        ctx.suite, f"{kind}/read/{size_name(n)}", "roundtrip_p50", [s[1] for s in results[kind]["read"][n]], "us",
        base, [s[1] for s in results[base]["read"][n]],
        {**params, "transport": kind, "bytes": n,
         **({"target": f"<= {target}x the baseline's (ratio >= {1 / target:.3f})"} if target else {})},
        lower_is_better=True))
