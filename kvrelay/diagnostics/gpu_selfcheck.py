"""GPU checks of the transport half: nvlink and NIXL VRAM between two processes, and the store with a GPU client.

Owns: `check_nvlink()`, `check_nixl_vram()`, `check_store_gpu()` (parts of kvrelay/diagnostics/gpu_check.py),
each returning ``{"ok": bool, ...figures}`` or ``{"ok": False, "error" | "skipped": why}``, never raising,
each well under two minutes on one GPU; and the peer process they start (``--peer``).  Must not touch:
anything but the tensors, endpoints and the store daemon they create (all closed or killed at the end).

No manual synchronisation anywhere: every pack is a kernel queued behind ``torch.cuda._sleep`` on the
caller's current stream right before the write is posted, and every unpack is queued right after the read
returns; a transport that does not order its copies with the caller's stream moves stale bytes, and the
byte-exact comparisons fail.  On a machine without CUDA each returns ``{"ok": False, "skipped": "no CUDA
device"}`` at once.

    python -m kvrelay.diagnostics.gpu_selfcheck      # all three, one JSON object

Built on the public APIs below it: transports (`kvrelay.transfer`), the store daemon (`DaemonProcess`) and
client (`StoreClient`), and kvrelay.proc for the peer process.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from kvrelay import proc

COMPAT = "kvrelay-gpu-selfcheck"
MIB = 1 << 20
SPIN_CYCLES = 20_000_000  # ~10 ms of GPU time ahead of each pack: long enough to lose a race


def _no_cuda() -> dict | None:
    try:
        import torch
    except ImportError:
        return {"ok": False, "skipped": "torch is not installed"}
    if not torch.cuda.is_available():
        return {"ok": False, "skipped": "no CUDA device"}
    return None


def _spin(device: str) -> None:
    """Keep the current stream of ``device`` busy for a while (nothing to do on CPU, where copies are eager)."""
    import torch
    if device.startswith("cuda"):
        torch.cuda._sleep(SPIN_CYCLES)


def _sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _guarded(fn: Callable[[], dict]) -> dict:
    skip = _no_cuda()
    if skip is not None:
        return skip
    t0 = time.monotonic()
    try:
        out = fn()
    except Exception as exc:  # noqa: BLE001 - a check reports, it never raises
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
               "where": traceback.format_exc().strip().splitlines()[-3:]}
    out["seconds"] = round(time.monotonic() - t0, 2)
    return out


# -- the peer process ----------------------------------------------------------------------------------
class _Peer:
    """A transport endpoint in another process holding one CUDA region; stops when its stdin closes."""

    def __init__(self, kind: str, nbytes: int, device: str = "cuda", timeout: float = 40.0) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="kvrelay-selfcheck-peer-")
        self.child = proc.spawn([sys.executable, "-m", "kvrelay.diagnostics.gpu_selfcheck", "--peer", kind,
                                 str(nbytes), device], name=f"the {kind} peer", pipes=True,
                                log=Path(self._tmp.name) / "stderr.log", tail_lines=30)
        try:
            info = self.child.read_json_line(timeout)
        except proc.StartError as exc:
            self.stop()
            raise RuntimeError(str(exc)) from None
        self.address, self.region = info["address"], int(info["region"])

    def stop(self) -> None:
        self.child.stop(15.0, sig=None)  # its stdin closed: it closes its endpoint and exits
        self.child.close_pipes()
        self._tmp.cleanup()


def _peer_main(kind: str, nbytes: int, device: str) -> int:
    import torch

    from kvrelay.transfer import create_transport
    ep = create_transport(kind, f"selfcheck-peer-{kind}", COMPAT)
    t = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    info = ep.register(t)
    _sync(device)  # the zeros exist before anyone writes into them
    print(json.dumps({"address": ep.address, "region": info.region_id}), flush=True)
    sys.stdin.read()  # until the checking process closes our stdin (or dies)
    ep.close()
    return 0


# -- the round trip both transports share --------------------------------------------------------------
def _round_trip(kind: str, nbytes: int = 64 * MIB, bw_bytes: int = 256 * MIB, reps: int = 5,
                device: str = "cuda") -> dict:
    """Write then read ``nbytes`` to a peer process's region, byte-exact, then time ``reps`` transfers of
    ``bw_bytes`` each way.  (``device="cpu"`` with a host transport: a dry run of this code, for CPU tests.)"""
    import torch

    from kvrelay.transfer import create_transport
    from kvrelay.transfer.base import Desc
    from kvrelay.transfer.endpoint import Endpoint

    peer = _Peer(kind, max(nbytes, bw_bytes), device)
    try:
        with create_transport(kind, f"selfcheck-{kind}", COMPAT) as ep:
            remote = ep.connect(peer.address, timeout=30)
            src = torch.empty(max(nbytes, bw_bytes), dtype=torch.uint8, device=device)
            dst = torch.zeros_like(src)
            rs, rd = ep.register(src), ep.register(dst)
            gen = torch.Generator(device=device).manual_seed(14)
            want = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device, generator=gen)
            # pack -> write: the pack waits behind a spinning kernel, the write is posted at once
            _spin(device)
            src[:nbytes].copy_(want)
            with ep.write(remote, [Desc(rs.region_id, 0, peer.region, 0, nbytes)], timeout=60) as h:
                h.result()
            # read -> unpack into a buffer a kernel is still reading (its old contents must be what it reads)
            dst[:nbytes].fill_(7)
            _spin(device)
            before = dst[:nbytes].clone()  # queued behind the spin: still running when the read is posted
            with ep.read(remote, [Desc(rd.region_id, 0, peer.region, 0, nbytes)], timeout=60) as h:
                h.result()
            got = dst[:nbytes].clone()  # the unpack, queued right after the read returned
            exact = bool(torch.equal(got, want))
            old_intact = bool((before == 7).all())
            out: dict[str, Any] = {"write_read_exact": exact, "reused_buffer_not_overwritten_early": old_intact,
                                   "bytes": nbytes}
            for op, fn in (("write", ep.write), ("read", ep.read)):
                desc = [Desc(rs.region_id if op == "write" else rd.region_id, 0, peer.region, 0, bw_bytes)]
                with fn(remote, desc, timeout=60) as h:  # warm-up
                    h.result()
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(reps):
                    with fn(remote, desc, timeout=60) as h:
                        h.result()
                out[f"{op}_GBps"] = round(reps * bw_bytes / (time.perf_counter() - t0) / 1e9, 2)
            out["open_handles"] = ep.open_handles() if isinstance(ep, Endpoint) else 0
            out["ok"] = exact and old_intact and out["open_handles"] == 0
            return out
    finally:
        peer.stop()


def check_nvlink() -> dict:
    """nvlink (CUDA IPC) pack->write and read->unpack between two processes on one GPU, byte-exact, with no
    manual sync, and the bandwidth of 256 MiB transfers."""
    return _guarded(lambda: _round_trip("nvlink"))


def check_nixl_vram() -> dict:
    """NIXL WRITE and READ of GPU memory between two processes (ok=False with a reason when nixl is missing or
    its UCX has no CUDA support)."""
    def run() -> dict:
        from kvrelay.transfer import available_transports
        why = available_transports()["nixl"]
        if why is not None:
            return {"ok": False, "skipped": why}
        try:
            return _round_trip("nixl")
        except Exception as exc:  # noqa: BLE001
            if "VRAM" in str(exc) or "cuda" in str(exc).lower() or "register" in str(exc).lower():
                return {"ok": False, "skipped": f"nixl has no usable CUDA backend here: {type(exc).__name__}: {exc}"}
            raise
    return _guarded(run)


def check_store_gpu(layers: int = 4, chunk_bytes: int = 8 * MIB) -> dict:
    """A `kvrelay store` daemon and clients whose buffers are on the GPU: publish ``layers`` chunks from CUDA
    tensors and pull them back into CUDA tensors, byte-exact, over shm (pinned pool) and tcp."""
    return _guarded(lambda: _store_check(layers, chunk_bytes, "cuda"))


def _store_check(layers: int, chunk_bytes: int, device: str) -> dict:
    """check_store_gpu's body (``device="cpu"``: a dry run of this code, for CPU tests)."""
    import torch

    from kvrelay.keys import ChunkKey
    from kvrelay.store.client import StoreClient
    from kvrelay.store.process import DaemonProcess
    from kvrelay.transfer.wire import ChunkHeader, checksum

    tmp = tempfile.TemporaryDirectory(prefix="kvrelay-selfcheck-")
    log = Path(tmp.name) / "store.log"
    daemon = DaemonProcess(pool_size="256MiB", pool_name=f"kvrelay-selfcheck-{os.getpid()}", metrics_port=-1,
                           transports="shm,tcp")
    try:
        try:
            info = daemon.start(timeout=40, log_path=str(log)).info
        except (RuntimeError, TimeoutError) as exc:
            return {"ok": False, "error": f"the store daemon did not start: {exc}: {log.read_text()[-1500:]}"}
        gen = torch.Generator(device=device).manual_seed(9)
        out: dict[str, Any] = {"layers": layers, "chunk_bytes": chunk_bytes}
        for transport in ("shm", "tcp"):
            with StoreClient(info["address"], transport=transport, compat_hash=COMPAT,
                             name=f"gpu-{transport}") as c:
                if device.startswith("cuda"):
                    c.use_gpu()
                datas = [torch.randint(0, 256, (chunk_bytes,), dtype=torch.uint8, device=device, generator=gen)
                         for _ in range(layers)]
                base = 0x5E1FC4EC << (64 if transport == "shm" else 32)
                keys = [ChunkKey(f"{base + i:032x}", i, 0, 8) for i in range(layers)]
                t0 = time.perf_counter()
                for i, (k, d) in enumerate(zip(keys, datas, strict=True)):
                    _spin(device)  # the layer's pack is still running when publish is called
                    packed = d.clone()
                    header = ChunkHeader(compat_hash=COMPAT, layer=i, token_start=0, token_end=16, head_start=0,
                                         head_end=8, dtype="uint8", nbytes=chunk_bytes,
                                         checksum=checksum(d.cpu()))
                    c.publish(k, header, packed)
                pub_s = time.perf_counter() - t0
                outs = [torch.zeros(chunk_bytes, dtype=torch.uint8, device=device) for _ in range(layers)]
                t0 = time.perf_counter()
                c.pull_many(keys, outs, time.monotonic() + 30)
                pull_s = time.perf_counter() - t0
                exact = all(bool(torch.equal(o, d)) for o, d in zip(outs, datas, strict=True))
                out[transport] = {"exact": exact, "publish_GBps": round(layers * chunk_bytes / pub_s / 1e9, 2),
                                  "pull_GBps": round(layers * chunk_bytes / pull_s / 1e9, 2)}
                if transport == "shm" and device.startswith("cuda"):
                    pinning = c.gpu_pinning(timeout=20)
                    if pinning is None:
                        raise RuntimeError("a same-host (shm) store client maps no pool to pin")
                    out["shm"].update(pinned_bytes=pinning["pinned_bytes"], pin_seconds=round(pinning["seconds"], 2),
                                      pin_error=pinning["error"])
        out["ok"] = all(out[t]["exact"] for t in ("shm", "tcp")) and out["shm"].get("pin_error") is None
        return out
    finally:
        daemon.stop()
        tmp.cleanup()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--peer"]:
        return _peer_main(argv[1], int(argv[2]), argv[3])
    results = {"nvlink": check_nvlink(), "nixl_vram": check_nixl_vram(), "store_gpu": check_store_gpu()}
    print(json.dumps(results, indent=2))
    return 0 if all(r["ok"] or "skipped" in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
