"""Page-locking ("pinning") the mapped store pool for GPU clients, lazily, in slices, in the background.

Owns: `PoolPinner` (cudaHostRegister of the pool mapping in this process, slice by slice, with the
portable flag; cudaHostUnregister at close) and `cuda_runtime()` (the three runtime calls it needs).
Must not touch: the pool's contents, the copies (datapath.py), the daemon.

Rules (issue 14, finding 9):
  * Only a process that actually copies between a CUDA tensor and the pool pins it, and only from its
    first such copy: a CPU-only client never calls into CUDA (not even ``torch.cuda.is_available()``,
    which initialises the driver), so it creates no CUDA context.
  * ``cudaHostRegisterPortable``: the pages count as pinned for every CUDA context of the process (all its
    GPUs), not only the context current at registration.
  * A failed register leaves a sticky "last error" in the runtime that the next unrelated CUDA call would
    report (``torch.cuda`` raises it from a later kernel launch); it is read and cleared at once with
    ``cudaGetLastError``, and the pool stays pageable (copies stay correct, only slower).
  * A multi-GB pool takes seconds to pin, so it is pinned by a background thread in `SLICE_BYTES` slices;
    copies meanwhile run from pageable memory (correct, slower) and `pinned_bytes` shows the progress.
    The daemon does none of this: pinning is per process and per mapping, so it is the GPU client's
    business; the daemon serves throughout.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from typing import Protocol

log = logging.getLogger("kvrelay.store.pinning")

SLICE_BYTES = 256 << 20
CUDA_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable (cuda_runtime_api.h)


class CudaRuntime(Protocol):
    def host_register(self, ptr: int, nbytes: int, flags: int) -> int: ...
    def host_unregister(self, ptr: int) -> int: ...
    def get_last_error(self) -> int: ...


class _TorchRuntime:
    """torch's cudart bindings for (un)register, the runtime library itself (already loaded by torch, found
    by its soname) for cudaGetLastError, which torch does not bind."""

    def __init__(self) -> None:
        import torch
        self._rt = torch.cuda.cudart()
        self._lib = None
        for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so"):
            try:
                self._lib = ctypes.CDLL(name, mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
                break
            except OSError:
                continue

    def host_register(self, ptr: int, nbytes: int, flags: int) -> int:
        return int(self._rt.cudaHostRegister(ptr, nbytes, flags))

    def host_unregister(self, ptr: int) -> int:
        return int(self._rt.cudaHostUnregister(ptr))

    def get_last_error(self) -> int:
        if self._lib is None:  # a static runtime: torch reports the error itself, once, on its next check
            return -1
        return int(self._lib.cudaGetLastError())


def cuda_runtime() -> CudaRuntime:
    return _TorchRuntime()


class PoolPinner:
    """Pins ``[base, base + nbytes)`` (a page-aligned mapping) once `start` is called, never before."""

    def __init__(self, base: int, nbytes: int, *, slice_bytes: int = SLICE_BYTES,
                 runtime_factory=cuda_runtime) -> None:
        if slice_bytes <= 0 or slice_bytes % 4096:
            raise ValueError(f"slice_bytes must be a positive multiple of 4096, got {slice_bytes}")
        self.base, self.nbytes, self.slice_bytes = base, nbytes, slice_bytes
        self._factory = runtime_factory
        self._rt: CudaRuntime | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._registered: list[int] = []  # slice addresses registered (unregistered at close)
        self.pinned_bytes = 0
        self.error: str | None = None  # why pinning stopped early (the rest stays pageable)
        self.seconds = 0.0

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Begin pinning in the background (idempotent; cheap once started)."""
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="kvrelay-pool-pin", daemon=True)
            self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Whether pinning has finished (or stopped) within ``timeout``."""
        t = self._thread
        if t is None:
            return False
        t.join(timeout)
        return not t.is_alive()

    def _run(self) -> None:
        t0 = time.monotonic()
        try:
            rt = self._rt = self._factory()
        except Exception as exc:  # noqa: BLE001 - no CUDA runtime after all: stay pageable
            self.error = f"no CUDA runtime to pin the pool with: {exc}"
            return
        off = 0
        while off < self.nbytes and not self._stop.is_set():
            n = min(self.slice_bytes, self.nbytes - off)
            err = rt.host_register(self.base + off, n, CUDA_HOST_REGISTER_PORTABLE)
            if err != 0:
                rt.get_last_error()  # clear the sticky error: the next unrelated CUDA call must not see it
                self.error = (f"cudaHostRegister of pool bytes [{off}, {off + n}) failed (cudaError {err}); "
                              f"the rest of the pool stays pageable (copies to the GPU are slower, still correct)")
                log.warning("%s", self.error)
                break
            with self._lock:
                self._registered.append(self.base + off)
                self.pinned_bytes += n
            off += n
        self.seconds = time.monotonic() - t0
        if self.error is None and not self._stop.is_set():
            log.info("pinned the %d-byte store pool for GPU copies in %.2f s", self.pinned_bytes, self.seconds)

    def close(self) -> None:
        """Stop pinning and unregister every slice registered (no CUDA call if nothing was)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            regs, self._registered = self._registered, []
            self.pinned_bytes = 0
        if regs and self._rt is not None:
            for ptr in regs:
                if self._rt.host_unregister(ptr) != 0:
                    self._rt.get_last_error()
