"""Control-plane messages (handshake, notifications, goodbye) and the per-peer connection record.

Owns: `Hello`/`Welcome`/`Refuse`/`Notify`/`Bye` (msgpack, tagged) and `PeerConn` (with its liveness
check).  Must not touch:
sockets or threads (control_plane.py serves them).
"""

from __future__ import annotations

import os
import select
import threading
from dataclasses import dataclass, field
from typing import Callable, Union

import msgspec
import zmq

from kvrelay.transfer.base import AgentInfo, Peer, RegionInfo


class Hello(msgspec.Struct, tag="hello"):
    info: AgentInfo


class Welcome(msgspec.Struct, tag="welcome"):
    info: AgentInfo


class Refuse(msgspec.Struct, tag="refuse"):
    reason: str


class Notify(msgspec.Struct, tag="notify"):
    name: str
    epoch: str
    payload: bytes


class Bye(msgspec.Struct, tag="bye"):
    name: str
    epoch: str


class Unmap(msgspec.Struct, tag="unmap"):
    """The sender deregistered ``region_id``: drop it from its peer record and unmap it (nvlink)."""
    name: str
    epoch: str
    region_id: int


Message = Union[Hello, Welcome, Refuse, Notify, Bye, Unmap]
encoder = msgspec.msgpack.Encoder()
decoder = msgspec.msgpack.Decoder(Message)


@dataclass(eq=False)
class PeerConn:
    """A peer's live state.  ``alive`` turns False once (death, restart, disconnect) and stays False."""

    peer: Peer
    alive: bool = True
    reason: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)
    ctrl: zmq.Socket | None = None
    pidfd: int | None = None
    pid_poll: select.poll | None = None  # holds pidfd: the cheapest "has it exited?" check
    extra: dict = field(default_factory=dict)  # transport-specific state
    _sizes: tuple = (None, {})  # (the Peer they were computed for, region id -> nbytes)

    def sizes_for(self, reachable: Callable[[RegionInfo], bool]) -> dict[int, int]:
        """Sizes of the peer's regions that ``reachable`` accepts, cached until the peer record changes
        (``reachable`` must be the same function for a given connection)."""
        peer, sizes = self._sizes
        if peer is not self.peer:
            peer = self.peer
            sizes = {r.region_id: r.nbytes for r in peer.info.regions if reachable(r)}
            self._sizes = (peer, sizes)
        return sizes

    def watch_pid(self, pid: int) -> bool:
        """Open a pidfd for a same-host peer's process; False if it is not running."""
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        self.pid_poll = poller  # before pidfd: a pidfd without its poller would read as "exited"
        self.pidfd = fd
        return True

    def exited(self) -> bool:
        """True once the peer is known dead: marked lost, or its pidfd is readable (a poll, ~1 us)."""
        return not self.alive or self.pidfd_readable()

    def pidfd_readable(self) -> bool:
        """Whether this same-host peer's process has exited (False when there is no pidfd)."""
        fd, poller = self.pidfd, self.pid_poll
        if fd is None or poller is None:
            return False
        try:
            return bool(poller.poll(0))
        except RuntimeError:  # another thread is polling the same object right now
            pass
        except (OSError, ValueError):
            return True
        try:
            return bool(select.select([fd], [], [], 0)[0])
        except (OSError, ValueError):
            return True

    @property
    def key(self) -> tuple[str, str]:
        return (self.peer.info.name, self.peer.info.epoch)
