"""`kvrelay bench transports`: each transport's throughput and latency beside its raw primitive.

Owns: the transports benchmark (chunk sizes 4 KiB..64 MiB, read and write, GB/s and latency p50/p99),
its baselines measured in the same run (memcpy on one and on two threads and between shm mappings,
loopback sockets, pyzmq with recv_into, a bare two-agent NIXL transfer, Mooncake's transfer engine over TCP when
installed) and the plot
``transports.png`` in ``ctx.out_dir``.  The far side of every pair runs in its own process
(kvrelay/transfer/bench_peer.py).  Must not touch: the transports (public API only).

Ratios (Record.ratio): shm vs each memcpy (one thread, two threads, between shm mappings) and vs the best
of them at each size, tcp vs raw pyzmq, tcp vs raw socket, tcp vs Mooncake TCP,
nixl vs raw NIXL; at 4 KiB, round-trip p50 of shm and tcp vs the 100 us target.
"""

from __future__ import annotations

import json
import mmap
import os
import queue
import select
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from typing import Callable

import numpy as np

from kvrelay.bench.harness import BenchContext, Record, median, percentile

KIB, MIB = 1 << 10, 1 << 20
SIZES_FULL = (4 * KIB, 64 * KIB, 1 * MIB, 4 * MIB, 16 * MIB, 64 * MIB)
SIZES_QUICK = (4 * KIB, 1 * MIB, 16 * MIB)
LATENCY_TARGET_US = 100.0
Op = Callable[[int], None]


def _launch(kind: str, nbytes: int, stack: ExitStack, prefix: tuple[str, ...] = (), host: str = "127.0.0.1",
            env_extra: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """The bench peer of ``kind``, bound to ``host``, run under ``prefix`` (e.g. ``ip netns exec NS``)."""
    # unbuffered stdout: select() must see every byte the peer wrote (NIXL logs to stdout too)
    env = {"NIXL_LOG_LEVEL": "WARNING", **os.environ, **(env_extra or {})}  # NIXL logs to stdout, unread after start
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "kvrelay.transfer.bench_peer", kind, str(nbytes), host],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0,
                            env=env)

    def stop() -> None:
        try:
            if proc.stdin is not None:
                proc.stdin.close()  # the peer closes its endpoint and exits
            proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    stack.callback(stop)
    return proc


def _ready(kind: str, proc: subprocess.Popen[bytes], timeout: float = 300.0) -> dict:
    out = proc.stdout
    if out is None:
        raise ValueError(f"bench peer {kind} was started without a stdout pipe")
    deadline = time.monotonic() + timeout
    while True:
        if not select.select([out], [], [], max(0.0, deadline - time.monotonic()))[0]:
            raise TimeoutError(f"bench peer {kind} did not start within {timeout}s")
        line = out.readline()
        if not line:
            raise RuntimeError(f"bench peer {kind} exited with {proc.wait()}")
        if line.startswith(b"{"):
            return json.loads(line)


def _spawn(kind: str, nbytes: int, stack: ExitStack) -> dict:
    return _ready(kind, _launch(kind, nbytes, stack))


def _transport_ops(kind: str, meta: dict, nbytes: int, stack: ExitStack) -> dict[str, Op]:
    from kvrelay.transfer import create_transport
    return _endpoint_ops(create_transport(kind, f"bench-{kind}-client", "bench"), meta, nbytes, stack)


def _endpoint_ops(ep, meta: dict, nbytes: int, stack: ExitStack) -> dict[str, Op]:
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


def _socket_ops(meta: dict, nbytes: int, stack: ExitStack) -> dict[str, Op]:
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
            got += sock.recv_into(mv[got:n])

    def write(n: int) -> None:
        sock.sendall(_REQ.pack(b"w", n))
        sock.sendall(mv[:n])
        sock.recv_into(ack, 1)
    return {"read": read, "write": write}


def _zmq_ops(meta: dict, nbytes: int, stack: ExitStack) -> dict[str, Op]:
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


def _nixl_raw_ops(meta: dict, nbytes: int, stack: ExitStack) -> dict[str, Op]:
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


def _mooncake_ops(meta: dict, nbytes: int, stack: ExitStack) -> dict[str, Op]:
    from mooncake.engine import TransferEngine
    te = TransferEngine()
    if te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") != 0:
        raise RuntimeError("mooncake TransferEngine.initialize failed")
    buf = np.zeros(nbytes, np.uint8)
    te.register_memory(buf.ctypes.data, nbytes)
    stack.callback(lambda: te.unregister_memory(buf.ctypes.data))

    def read(n: int) -> None:
        if te.transfer_sync_read(meta["target"], buf.ctypes.data, meta["address"], n) != 0:
            raise RuntimeError("mooncake read failed")

    def write(n: int) -> None:
        if te.transfer_sync_write(meta["target"], buf.ctypes.data, meta["address"], n) != 0:
            raise RuntimeError("mooncake write failed")
    return {"read": read, "write": write}


def _memcpy_ops(nbytes: int, stack: ExitStack) -> dict[str, dict[str, Op]]:
    """The copy baselines: ``memcpy`` (np.copyto on one thread between preallocated heap buffers, which
    numpy backs with transparent huge pages), ``memcpy-mt`` (the same on two threads, a half each: the
    primitive behind shm's large transfers, where the copy thread and the waiting caller share the steps)
    and ``memcpy-shm`` (one thread between two /dev/shm mappings: shm's own memory, 4 KiB pages here).
    shm's target is against the best of them at each size.  torch's copy_ is left out: its OpenMP workers
    spin after each call, stalling whichever kind runs next on two cores (and its own copies, up to ms)."""
    src, dst = np.full(nbytes, 7, np.uint8), np.zeros(nbytes, np.uint8)

    def copy(n: int) -> None:
        np.copyto(dst[:n], src[:n])

    jobs: queue.SimpleQueue = queue.SimpleQueue()
    done: queue.SimpleQueue = queue.SimpleQueue()

    def helper() -> None:
        while (job := jobs.get()) is not None:
            np.copyto(*job)
            done.put(None)

    thread = threading.Thread(target=helper, name="bench-memcpy-helper", daemon=True)
    thread.start()
    def stop_helper() -> None:
        jobs.put(None)
        thread.join(5)

    stack.callback(stop_helper)

    def copy_mt(n: int) -> None:
        half = (n // 2) & ~63
        jobs.put((dst[half:n], src[half:n]))
        np.copyto(dst[:half], src[:half])
        done.get()

    ssrc, sdst = _shm_array(nbytes), _shm_array(nbytes)
    ssrc[:] = 7

    def copy_shm(n: int) -> None:
        np.copyto(sdst[:n], ssrc[:n])
    return {"memcpy": {"read": copy, "write": copy}, "memcpy-mt": {"read": copy_mt, "write": copy_mt},
            "memcpy-shm": {"read": copy_shm, "write": copy_shm}}


def _shm_array(nbytes: int) -> np.ndarray:
    """A /dev/shm mapping like the shm transport's (MAP_SHARED, populated), unlinked at once."""
    path = f"/dev/shm/kvrelay-bench-{os.getpid()}-{time.monotonic_ns()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.unlink(path)
        os.ftruncate(fd, nbytes)
        mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    finally:
        os.close(fd)
    return np.frombuffer(mm, np.uint8)  # the mapping goes with the last view of it


MEMCPY_KINDS = ("memcpy", "memcpy-mt", "memcpy-shm")


def _reps(n: int, quick: bool) -> int:
    if n <= 64 * KIB:
        return 100 if quick else 300
    budget = (48 if quick else 256) * MIB
    return int(min(100, max(5 if quick else 8, budget // n)))


def _measure_interleaved(ops: dict[str, Op], n: int, quick: bool) -> dict[str, tuple[float, float, float]]:
    """Per kind: (GB/s from the median, p50 us, p99 us) of single transfers of n bytes.  The kinds take
    turns transfer by transfer, so load from other processes on the host hits every kind alike and the
    ratios stay meaningful on a shared machine."""
    for fn in ops.values():
        fn(n)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in ops}
    for _ in range(_reps(n, quick)):
        for kind, fn in ops.items():
            t0 = time.perf_counter()
            fn(n)
            times[kind].append(time.perf_counter() - t0)
    return {k: (n / median(t) / 1e9, percentile(t, 50) * 1e6, percentile(t, 99) * 1e6) for k, t in times.items()}


def _kinds() -> tuple[list[str], dict[str, str]]:
    from kvrelay.transfer import available_transports
    skipped = {}
    kinds = []
    for name, reason in available_transports().items():
        if reason is None and name != "nvlink":
            kinds.append(name)
        else:
            skipped[name] = reason or "not benchmarked on CPU"
    kinds += ["socket", "zmq"]
    if "nixl" in kinds:
        kinds.append("nixl-raw")
    try:
        import mooncake.engine  # noqa: F401  (availability probe)
        kinds.append("mooncake")
    except Exception as exc:  # noqa: BLE001 - missing package or its native libraries
        skipped["mooncake"] = f"mooncake transfer engine not importable ({exc}); pip install " \
                              f"mooncake-transfer-engine-non-cuda and apt-get install libibverbs1"
    return kinds, skipped


def measure_all(ctx: BenchContext) -> tuple[dict, dict[str, str]]:
    """results[kind][op][size] = (GB/s, p50 us, p99 us)."""
    sizes = SIZES_QUICK if ctx.quick else SIZES_FULL
    nbytes = max(sizes)
    kinds, skipped = _kinds()
    with ExitStack() as stack:
        ops: dict[str, dict[str, Op]] = _memcpy_ops(nbytes, stack)
        for kind in ctx.steps(kinds, "start peers"):  # one at a time: two NIXL agents starting together can stall
            try:
                meta = _spawn(kind, nbytes, stack)
                if kind in ("shm", "tcp", "nixl"):
                    ops[kind] = _transport_ops(kind, meta, nbytes, stack)
                else:
                    ops[kind] = {"socket": _socket_ops, "zmq": _zmq_ops, "nixl-raw": _nixl_raw_ops,
                                 "mooncake": _mooncake_ops}[kind](meta, nbytes, stack)
            except Exception as exc:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
                skipped[kind] = f"{type(exc).__name__}: {exc}"
        results: dict = {kind: {"read": {}, "write": {}} for kind in ops}
        for op in ("read", "write"):
            for n in ctx.steps(sizes, f"{op} sizes"):
                for kind, r in _measure_interleaved({k: o[op] for k, o in ops.items()}, n, ctx.quick).items():
                    results[kind][op][n] = r
    return results, skipped


PAIRS = (("shm", "memcpy"), ("shm", "memcpy-mt"), ("shm", "memcpy-shm"), ("tcp", "zmq"), ("tcp", "socket"),
         ("tcp", "mooncake"), ("nixl", "nixl-raw"))


def run(ctx: BenchContext) -> None:
    results, skipped = measure_all(ctx)
    for kind, why in skipped.items():
        print(f"transports: {kind} skipped: {why}", file=sys.stderr)
    for kind, base in PAIRS:
        if kind not in results or base not in results:
            continue
        for op in ("read", "write"):
            for n, (gbs, p50, p99) in results[kind][op].items():
                b_gbs, b_p50, b_p99 = results[base][op][n]
                params = {"transport": kind, "op": op, "bytes": n}
                case = f"{kind}/{op}/{n // KIB}KiB"
                ctx.add(Record.compare("transports", case, "throughput", gbs, "GB/s", base, b_gbs, params))
                ctx.add(Record.compare("transports", case, "latency_p50", p50, "us", base, b_p50, params, True))
                ctx.add(Record.compare("transports", case, "latency_p99", p99, "us", base, b_p99, params, True))
    if "shm" in results:  # the target: shm against the fastest copy measured at that size
        for op in ("read", "write"):
            for n, (gbs, _, _) in results["shm"][op].items():
                best = max((k for k in MEMCPY_KINDS if k in results), key=lambda k: results[k][op][n][0])
                ctx.add(Record.compare("transports", f"shm/{op}/{n // KIB}KiB", "throughput_vs_best_memcpy", gbs,
                                       "GB/s", "memcpy-best", results[best][op][n][0],
                                       {"transport": "shm", "op": op, "bytes": n, "best": best}))
    for kind in ("shm", "tcp"):
        if kind in results:
            n = min(results[kind]["read"])
            p50 = results[kind]["read"][n][1]
            ctx.add(Record.compare("transports", f"{kind}/read/{n // KIB}KiB", "roundtrip_p50_vs_target", p50, "us",
                                   "target", LATENCY_TARGET_US, {"transport": kind, "bytes": n}, True))
    _plot(results, ctx)


def _plot(results: dict, ctx: BenchContext) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, op in zip(axes, ("read", "write"), strict=True):
        for kind, by_op in sorted(results.items()):
            sizes = sorted(by_op[op])
            style = "-o" if kind in ("shm", "tcp", "nixl") else "--."
            ax.plot(sizes, [by_op[op][n][0] for n in sizes], style, label=kind)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("chunk size (bytes)")
        ax.set_title(f"{op} (one transfer at a time)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("GB/s")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"kvrelay transports vs raw primitives ({os.cpu_count()} cores{', quick' if ctx.quick else ''})")
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    path = ctx.out_dir / "transports.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"transports: plot written to {path}", file=sys.stderr)
