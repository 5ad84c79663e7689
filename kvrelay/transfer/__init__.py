"""Transports: `create_transport(name, ...)` builds an endpoint; `available_transports()` says which work here.

Owns: the registry of transport implementations.  Must not touch: their internals.

    shm     same host, POSIX shared memory (one copy, or none with `map_remote`)
    tcp     ZeroMQ over TCP (any host; zero-copy frames into registered buffers)
    nixl    NIXL 1.5.1 agent with UCX (DRAM on CPU, VRAM on GPU)
    nvlink  CUDA IPC between GPUs of one node

Two lists, one source of truth for both: `ENGINE_TRANSPORTS` (every transport: each moves bytes between two
endpoints, e.g. engine to engine) and `STORE_TRANSPORTS` (those that can carry the store's data).  The
store's pool is host memory, so only transports that register host memory serve it; nvlink (CUDA IPC)
moves device memory only.  A GPU engine reaches a same-host store through shm: its copies run GPU <->
pinned pool by DMA (store/datapath.py).  `check_store_transport` names the choice when one is wrong.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing base pulls in torch (through the layout's wire version): keep it lazy
    from kvrelay.transfer.base import Transport

_IMPLS = ("shm", "tcp", "nixl", "nvlink")

ENGINE_TRANSPORTS = tuple(_IMPLS)
STORE_TRANSPORTS = ("shm", "tcp", "nixl")


def check_store_transport(name: str, what: str = "transport") -> None:
    """ValueError naming ``what`` unless ``name`` is a transport the store serves (`STORE_TRANSPORTS`)."""
    if name in STORE_TRANSPORTS:
        return
    if name == "nvlink":
        raise ValueError(f"{what} 'nvlink' cannot reach the store: CUDA IPC moves device memory between engines' "
                         f"endpoints, and the store's pool is host memory. Use shm (same host; a GPU client "
                         f"copies to and from the pinned pool by DMA), nixl or tcp")
    raise ValueError(f"{what} {name!r} is not a store transport; choose one of {', '.join(STORE_TRANSPORTS)}")


def _unavailable(name: str) -> str | None:
    if name == "shm":
        import os
        return None if os.path.isdir("/dev/shm") else "no /dev/shm on this host"
    if name == "tcp":
        return None
    if name == "nixl":
        try:
            import nixl._api  # noqa: F401
        except Exception as exc:  # ImportError, or a broken native library
            return f"nixl is not importable ({exc}); pip install nixl"
        return None
    if name == "nvlink":
        from kvrelay.transfer.nvlink import unavailable_reason
        return unavailable_reason()
    raise ValueError(f"unknown transport {name!r}; choose one of {', '.join(_IMPLS)}")


def available_transports() -> dict[str, str | None]:
    """Transport name -> None if usable on this machine, else the reason it is not."""
    return {name: _unavailable(name) for name in _IMPLS}


def create_transport(name: str, agent_name: str, compat_hash: str, host: str = "127.0.0.1", port: int = 0,
                     **options) -> Transport:
    """Build an endpoint of transport ``name``; ``options`` are that transport's keyword arguments."""
    if name not in _IMPLS:
        raise ValueError(f"unknown transport {name!r}; choose one of {', '.join(_IMPLS)}")
    reason = _unavailable(name)
    if reason is not None:
        raise RuntimeError(f"transport {name!r} is not available here: {reason}")
    return _transport_class(name)(agent_name, compat_hash, host=host, port=port, **options)


def _transport_class(name: str) -> type[Transport]:
    """The class of transport ``name``, imported when first asked for (nixl's and CUDA's imports are slow,
    or absent here)."""
    if name == "shm":
        from kvrelay.transfer.shm import ShmTransport
        return ShmTransport
    if name == "tcp":
        from kvrelay.transfer.tcp import TcpTransport
        return TcpTransport
    if name == "nixl":
        from kvrelay.transfer.nixl_transport import NixlTransport
        return NixlTransport
    if name == "nvlink":
        from kvrelay.transfer.nvlink import NvlinkTransport
        return NvlinkTransport
    raise ValueError(f"unknown transport {name!r}; choose one of {', '.join(_IMPLS)}")


__all__ = ["create_transport", "available_transports", "check_store_transport", "ENGINE_TRANSPORTS",
           "STORE_TRANSPORTS"]
