"""`tcp`: transport over TCP (any host): ZeroMQ for control and handshakes, plain sockets for bulk bytes.

Owns: `TcpTransport`: its options (frame sizes, data sockets per peer, encryption) and its handshake
metadata (the ZeroMQ data socket's address and security mode).  The data path is `TcpMover` (tcp_mover.py;
the plain sockets in tcp_conn.py and tcp_serve.py, the handshake in tcp_server.py).
Must not touch: the control plane (control_plane.py), the handle table (handles.py), chunk contents.
"""

from __future__ import annotations

import os
import weakref

import zmq

from kvrelay import security
from kvrelay.security.dataplane import ClientSession
from kvrelay.transfer.endpoint import Endpoint
from kvrelay.transfer.frames import FRAME_BYTES, SMALL_BYTES
from kvrelay.transfer.mover import DataMover
from kvrelay.transfer.tcp_mover import TcpMover

__all__ = ["TcpTransport", "TcpMover", "DIRECT_SOCKETS"]

DIRECT_SOCKETS = 16  # data sockets per peer: transfers beyond this many in flight are pipelined on them


class TcpTransport(Endpoint):
    name = "tcp"

    def __init__(self, agent_name: str, compat_hash: str, host: str = "127.0.0.1", port: int = 0,
                 frame_bytes: int = FRAME_BYTES, small_bytes: int = SMALL_BYTES,
                 direct_sockets: int = DIRECT_SOCKETS, encrypt: bool | None = None,
                 socket_buffer: int | None = None) -> None:
        if encrypt is None:
            encrypt = os.environ.get("KVRELAY_TCP_ENCRYPT", "") not in ("", "0")
        if encrypt and security.current() is None:
            raise ValueError("an encrypted tcp data plane needs keys: `kvrelay keys DIR`, then --keys DIR")
        self._encrypt = encrypt
        if socket_buffer is None:  # SO_SNDBUF/SO_RCVBUF of the data sockets; 0: the kernel's autotuning
            socket_buffer = int(os.environ.get("KVRELAY_TCP_SOCKBUF", "0") or 0)
        if socket_buffer < 0:
            raise ValueError(f"socket_buffer must be >= 0 bytes (0: the kernel's autotuning), got {socket_buffer}")
        self.socket_buffer = socket_buffer
        self.direct_sockets = direct_sockets
        self.frame_bytes = frame_bytes
        self.small_bytes = small_bytes
        super().__init__(agent_name, compat_hash, host, port)

    def _data_mover(self) -> DataMover:
        # with keys the data plane is authenticated (a handshake per connection, a MAC per request header:
        # kvrelay/security/dataplane.py says what that covers), or encrypted when asked to (the handshake over
        # CURVE, the bulk bytes with AES-256-GCM; the mode keeps its historical name "curve")
        self.data_security = "" if self.keys is None else "curve" if self._encrypt else "hmac"
        self._tcp = TcpMover(self.agent_name, self._ctx, self.keys, self.data_security, self.host, self._regions,
                             self.frame_bytes, self.small_bytes, self.direct_sockets, self.socket_buffer)
        return self._tcp

    def _agent_meta(self) -> bytes:
        return self._tcp.meta()

    @property
    def _client_sessions(self) -> weakref.WeakKeyDictionary[zmq.Socket, ClientSession]:
        """The data sockets' sessions with keys (a test replays a request on one)."""
        return self._tcp._client_sessions
