"""CURVE on ZeroMQ server sockets: the ZAP handler that admits only the cluster's client key, and a
monitor that notices peers that never got as far as ZAP (no CURVE at all, or a wrong server key).

A refusal by ZAP (a client that knows the server's public key but not the client secret) and a failed
handshake (a plaintext peer; a peer with another key directory) are each logged and counted through
`kvrelay.security.metrics.refused` under the socket's plane.

One ZAP thread (``zmq.auth.thread.ThreadAuthenticator``) runs per context that has a CURVE server;
`release(ctx)` stops it and must be called before ``ctx.term()`` (term waits for its sockets).

Owns: ZAP and handshake monitoring.  Must not touch: what the sockets carry.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Protocol

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from kvrelay.security.metrics import refused

log = logging.getLogger("kvrelay.security")


class ServerKeys(Protocol):
    """What a CURVE server needs of a key directory (keyfiles.Keys has it): its own keypair and the one
    client public key it admits (z85 bytes)."""

    @property
    def server_public(self) -> bytes: ...
    @property
    def server_secret(self) -> bytes: ...
    @property
    def client_public(self) -> bytes: ...


class _Zap(ThreadAuthenticator):
    """pyzmq's ZAP thread, counting and logging each refusal with the peer's plane and address."""

    def __init__(self, ctx: zmq.Context) -> None:
        super().__init__(ctx, log=logging.getLogger("kvrelay.security.zap"))
        self._peer = ("", "")

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        if len(msg) >= 4:
            self._peer = (msg[2].decode(errors="replace"), msg[3].decode(errors="replace"))
        await super().handle_zap_message(msg)

    def _send_zap_reply(self, request_id: bytes, status_code: bytes, status_text: bytes,
                        user_id: str = "anonymous") -> None:
        if status_code != b"200":
            plane, address = self._peer
            refused(plane or "zmq", f"CURVE client key not in the key directory ({status_text.decode()})", address)
        super()._send_zap_reply(request_id, status_code, status_text, user_id)


class _ClientKeys:
    """ZAP credentials provider: the key directory's client public key, and nothing else."""

    def __init__(self, allowed: bytes) -> None:
        self.allowed = allowed

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self.allowed


_FAILED = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL


class _Watch:
    """One thread for the whole process reading every CURVE server's monitor socket; a monitor closes
    itself when its socket closes (MONITOR_STOPPED)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._new: list[tuple[zmq.Socket, str]] = []
        self._r, self._w = os.pipe()
        self._thread: threading.Thread | None = None

    def add(self, sock: zmq.Socket, plane: str) -> None:
        mon = sock.get_monitor_socket(_FAILED | zmq.EVENT_MONITOR_STOPPED)
        with self._lock:
            self._new.append((mon, plane))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kvrelay-auth-watch", daemon=True)
                self._thread.start()
        os.write(self._w, b"x")

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._r, zmq.POLLIN)
        planes: dict[zmq.Socket, str] = {}
        while True:
            try:
                ready = poller.poll()
            except zmq.ZMQError:  # a context is being terminated: close its monitors so that term() returns
                for mon in list(planes):
                    try:
                        mon.poll(0)
                    except zmq.ZMQError:
                        poller.unregister(mon)
                        planes.pop(mon, None)
                        mon.close(linger=0)
                continue
            for item, _ in ready:
                if item == self._r:
                    os.read(self._r, 4096)
                    with self._lock:
                        new, self._new = self._new, []
                    for mon, plane in new:
                        planes[mon] = plane
                        poller.register(mon, zmq.POLLIN)
                    continue
                assert isinstance(item, zmq.Socket)
                try:
                    event: dict[str, Any] = dict(recv_monitor_message(item, zmq.NOBLOCK))
                except zmq.Again:
                    continue
                except zmq.ZMQError:
                    event = {"event": zmq.EVENT_MONITOR_STOPPED}
                if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                    poller.unregister(item)
                    planes.pop(item, None)
                    item.close(linger=0)
                elif event["event"] & _FAILED:
                    refused(planes[item], "handshake failed: the peer has no CURVE key or another key directory's "
                            "server key", event.get("endpoint", b"").decode(errors="replace"))


_WATCH = _Watch()
_zaps: dict[int, tuple[zmq.Context, _Zap]] = {}
_zaps_lock = threading.Lock()


def make_server(keys: ServerKeys, sock: zmq.Socket, plane: str) -> None:
    """CURVE server options on ``sock`` (call before bind), ZAP for its context, and a handshake monitor."""
    ctx = sock.context
    with _zaps_lock:
        entry = _zaps.get(id(ctx))
        if entry is None or entry[0] is not ctx:
            zap = _Zap(ctx)
            zap.start()
            _zaps[id(ctx)] = (ctx, zap)
        else:
            zap = entry[1]
        zap.configure_curve_callback(domain=plane, credentials_provider=_ClientKeys(keys.client_public))
    sock.zap_domain = plane.encode()
    sock.curve_server = True
    sock.curve_publickey = keys.server_public
    sock.curve_secretkey = keys.server_secret
    _WATCH.add(sock, plane)


def release(ctx: zmq.Context) -> None:
    """Stop ``ctx``'s ZAP thread, if it has one (before ``ctx.term()``)."""
    with _zaps_lock:
        entry = _zaps.pop(id(ctx), None)
    if entry is not None:
        entry[1].stop()
