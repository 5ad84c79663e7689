"""Control-plane messages (handshake, notifications, goodbye) and the per-peer connection record.

Owns: `Hello`/`Welcome`/`Refuse`/`Notify`/`Bye` (msgpack, tagged) and `PeerConn`.  Must not touch:
sockets or threads (endpoint.py serves them).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Union

import msgspec
import zmq

from kvrelay.transfer.base import AgentInfo, Peer


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


Message = Union[Hello, Welcome, Refuse, Notify, Bye]
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
    extra: dict = field(default_factory=dict)  # transport-specific state

    @property
    def key(self) -> tuple[str, str]:
        return (self.peer.info.name, self.peer.info.epoch)
