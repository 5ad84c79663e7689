"""The `Transport` interface: one-sided reads and writes of registered memory, plus notifications.

Every transport (shm, tcp, nixl, nvlink) implements this and passes the same conformance suite
(tests/transfer/).  Owns: the types that cross the interface.  Must not touch: chunk contents or
layouts (those are kernels/ and wire.py).

Model (NIXL-like):
  * An endpoint (`Transport` instance) has a name, an epoch id (a fresh uuid per process start: a
    restarted peer is a new peer) and an address peers connect to.
  * `register()` exposes a buffer (CPU; CUDA where the transport supports it) as a region with an id.
  * `connect(address)` performs the handshake: both sides exchange `AgentInfo` (name, epoch,
    compatibility hash, wire version, regions).  A compat-hash or wire-version mismatch raises
    `HandshakeError` naming both values.  Connecting again to a peer whose epoch changed drops the old
    peer's metadata.
  * `read(peer, descs)` copies remote -> local, `write(peer, descs)` local -> remote.  Each returns an
    `XferHandle` at once; every handle has a deadline, and fails with a reason when it passes.
  * `notify(peer, payload)` sends a small message; `get_notifications()` drains received ones.

Thread safety: register/deregister/connect/read/write/notify/get_notifications and all `XferHandle`
methods may be called from any thread.  `close()` must not race with other calls.
"""

from __future__ import annotations

import enum
import time
import uuid
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Sequence

import msgspec

from kvrelay.versions import WIRE_VERSION

if TYPE_CHECKING:
    import torch

DEFAULT_TIMEOUT_S = 30.0


class TransferError(RuntimeError):
    """A transfer failed (peer died, deadline passed, bad descriptor...).  The message says why."""


class HandshakeError(TransferError):
    """The peers disagree on something they must agree on (compat hash, wire version) or cannot talk."""


class XferState(str, enum.Enum):
    PENDING = "pending"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (XferState.DONE, XferState.FAILED, XferState.CANCELLED)


class Desc(msgspec.Struct, frozen=True, array_like=True):
    """Copy ``length`` bytes between local region+offset and remote region+offset."""

    local_region: int
    local_offset: int
    remote_region: int
    remote_offset: int
    length: int


class RegionInfo(msgspec.Struct, frozen=True):
    """A registered region as described to peers.  ``meta`` is transport-specific (shm name, NIXL
    descriptor blob, CUDA IPC handle...)."""

    region_id: int
    nbytes: int
    device: str = "cpu"
    meta: bytes = b""


class AgentInfo(msgspec.Struct, frozen=True):
    """What the handshake exchanges."""

    name: str
    epoch: str
    transport: str
    compat_hash: str
    address: str
    wire_version: int = WIRE_VERSION
    regions: list[RegionInfo] = []
    meta: bytes = b""  # transport-specific agent metadata (e.g. NIXL agent metadata)
    pid: int = 0  # the endpoint's process id (same-host liveness checks); 0 = unknown
    hostname: str = ""  # socket.gethostname() of the endpoint's process


class Notification(msgspec.Struct, frozen=True):
    peer: str
    epoch: str
    payload: bytes


class Peer(msgspec.Struct):
    """A connected peer as seen locally."""

    info: AgentInfo
    connected_at: float = msgspec.field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return self.info.name

    def region(self, region_id: int) -> RegionInfo:
        for r in self.info.regions:
            if r.region_id == region_id:
                return r
        raise ValueError(f"peer {self.info.name!r} has no region {region_id} "
                         f"(it has {[r.region_id for r in self.info.regions]})")


def check_compat(local: AgentInfo, remote: AgentInfo) -> None:
    """Refuse a peer whose compat hash or wire version differs; the message names both sides' values."""
    if remote.wire_version != local.wire_version:
        raise HandshakeError(f"wire version mismatch: local {local.name!r} speaks {local.wire_version}, "
                             f"peer {remote.name!r} speaks {remote.wire_version}")
    if remote.compat_hash != local.compat_hash:
        raise HandshakeError(f"compatibility hash mismatch: local {local.name!r} has {local.compat_hash}, "
                             f"peer {remote.name!r} has {remote.compat_hash} (model, dtype, head_dim, heads, "
                             f"layers or wire version differ)")
    if remote.transport != local.transport:
        raise HandshakeError(f"transport mismatch: local is {local.transport!r}, peer is {remote.transport!r}")


def check_descs(descs: Sequence[Desc], local_sizes: dict[int, int], remote: Peer) -> None:
    """Bounds-check descriptors against local and remote regions; raise ValueError naming the culprit."""
    for i, d in enumerate(descs):
        if d.length < 0 or d.local_offset < 0 or d.remote_offset < 0:
            raise ValueError(f"descriptor {i} has a negative offset or length: {d}")
        size = local_sizes.get(d.local_region)
        if size is None:
            raise ValueError(f"descriptor {i}: local region {d.local_region} is not registered")
        if d.local_offset + d.length > size:
            raise ValueError(f"descriptor {i}: local range [{d.local_offset}, {d.local_offset + d.length}) is "
                             f"outside region {d.local_region} of {size} bytes")
        r = remote.region(d.remote_region)
        if d.remote_offset + d.length > r.nbytes:
            raise ValueError(f"descriptor {i}: remote range [{d.remote_offset}, {d.remote_offset + d.length}) is "
                             f"outside peer {remote.name!r} region {d.remote_region} of {r.nbytes} bytes")


class XferHandle(ABC):
    """An asynchronous transfer.  Always reaches a terminal state: DONE, FAILED (with `error`) or
    CANCELLED; at the latest when its deadline passes."""

    @property
    @abstractmethod
    def state(self) -> XferState: ...

    @property
    @abstractmethod
    def error(self) -> str | None: ...

    @abstractmethod
    def wait(self, timeout: float | None = None) -> XferState:
        """Block until terminal, ``timeout`` seconds, or the handle's deadline; return the state."""

    @abstractmethod
    def cancel(self) -> None:
        """Stop the transfer if still running; the state becomes CANCELLED unless already terminal."""

    @abstractmethod
    def release(self) -> None:
        """Free what the handle holds (cancels first if still running).  Idempotent."""

    def result(self, timeout: float | None = None) -> None:
        """Wait and raise `TransferError` unless DONE."""
        state = self.wait(timeout)
        if state is not XferState.DONE:
            raise TransferError(self.error or f"transfer ended {state.value}")

    def __enter__(self) -> "XferHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Transport(ABC):
    """One endpoint of a transport.  See the module docstring for the model and thread safety."""

    name: str = "?"

    def __init__(self, agent_name: str, compat_hash: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.agent_name = agent_name
        self.compat_hash = compat_hash
        self.host = host
        self.port = port
        self.epoch = uuid.uuid4().hex

    @property
    @abstractmethod
    def address(self) -> str:
        """Where peers connect for the handshake (e.g. ``tcp://127.0.0.1:41234``)."""

    @abstractmethod
    def register(self, buf) -> RegionInfo:
        """Expose a buffer (torch tensor, numpy array, mmap, or another writable buffer) as a region."""

    @abstractmethod
    def alloc(self, nbytes: int) -> tuple[RegionInfo, memoryview | torch.Tensor]:
        """Allocate and register ``nbytes`` of zeroed memory of the kind this transport moves (host memory
        as a memoryview; a CUDA tensor for nvlink); return its region and the memory."""

    @abstractmethod
    def deregister(self, region_id: int) -> None: ...

    @abstractmethod
    def info(self) -> AgentInfo:
        """This endpoint's handshake metadata."""

    @abstractmethod
    def connect(self, address: str, timeout: float = DEFAULT_TIMEOUT_S) -> Peer:
        """Handshake with the peer at ``address``; refuse mismatches with `HandshakeError`."""

    @abstractmethod
    def disconnect(self, peer: Peer) -> None: ...

    @abstractmethod
    def read(self, peer: Peer, descs: Sequence[Desc], timeout: float = DEFAULT_TIMEOUT_S) -> XferHandle:
        """Remote -> local.  Bad descriptors raise ValueError before anything moves."""

    @abstractmethod
    def write(self, peer: Peer, descs: Sequence[Desc], timeout: float = DEFAULT_TIMEOUT_S) -> XferHandle:
        """Local -> remote.  Bad descriptors raise ValueError before anything moves."""

    @abstractmethod
    def notify(self, peer: Peer, payload: bytes) -> None: ...

    @abstractmethod
    def get_notifications(self, timeout: float = 0.0) -> list[Notification]:
        """Drain received notifications, waiting up to ``timeout`` seconds for the first."""

    @abstractmethod
    def close(self) -> None:
        """Cancel outstanding handles, release regions and sockets.  Idempotent."""

    def __enter__(self) -> "Transport":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
