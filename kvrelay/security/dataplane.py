"""Authentication of the tcp data plane without encrypting it: a challenge-response per connection that
yields a session key, then a MAC over every request header under that key.

What "authenticated" means here.  The data plane moves chunks in the clear at memcpy-like speed; CURVE
on it costs about 5x (kvrelay bench auth).  What must not happen is a peer without the cluster's secret
reading or writing registered memory (the store's pool).  So:

* each data socket opens with a three-message handshake: client nonce -> server nonce and the server's
  proof (HMAC(secret, "server", cn, sn)) -> the client's proof (HMAC(secret, "client", cn, sn)).  Both
  sides prove they hold the secret, the fresh server nonce makes a recorded handshake useless on another
  connection, and both derive the session key K = HMAC(secret, "session", cn, sn);
* every request header (op, transfer id, ranges, a sequence number) carries a MAC under K (keyed
  BLAKE2b, RFC 7693: about 1 us a header here, where OpenSSL's HMAC-SHA256 costs about 8):
  without K no request is served, a replayed one is refused (its sequence number is not above the last),
  and a connection whose routing identity was taken over after a reconnect has no K.

Not covered, on purpose: the bytes of chunks (read replies, write payloads) carry no MAC, so an attacker
who can already inject into an established TCP connection could alter them undetected by this layer
(the end-to-end chunk checksum catches accidents, not adversaries).  A MAC over a non-cryptographic
checksum would not change that; a real per-payload MAC costs a pass over every byte.  Where the path is
not trusted, encrypt (CURVE on the data sockets: ``encrypt=True`` on the tcp transport, or
``KVRELAY_TCP_ENCRYPT=1``), which authenticates and protects the payload too.

Owns: the handshake messages' MACs, the per-connection sessions of a server, and request MACs.  Must not
touch: sockets or framing (kvrelay/transfer/tcp*.py call in here).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import OrderedDict

from kvrelay.security.keyfiles import Keys
from kvrelay.security.metrics import refused

NONCE_BYTES = 16
TAG_BYTES = 32
TAGGED = b"\0"  # first byte of a request frame that carries its MAC: TAGGED + MAC + head
MAX_SESSIONS = 65536  # per server: the oldest is forgotten (its connection must handshake again)
PLANE = "tcp-data"


def request_mac(key: bytes, head: bytes) -> bytes:
    """A request header's MAC under its connection's session key (keyed BLAKE2b, 32 bytes)."""
    return hashlib.blake2b(head, key=key, digest_size=TAG_BYTES).digest()


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.digest(key, b"".join(len(p).to_bytes(4, "little") + p for p in parts), "sha256")


class ClientSession:
    """The client side of one data socket's handshake, then the MACs of its requests."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self.nonce = os.urandom(NONCE_BYTES)
        self.key = b""
        self.seq = 0

    def answer(self, server_nonce: bytes, server_proof: bytes) -> tuple[bytes, str]:
        """The client's proof for the server's challenge, and an error ('' if the server proved the secret)."""
        secret = self.keys.secret
        proof = _mac(secret, b"client", self.nonce, server_nonce)
        if len(server_nonce) != NONCE_BYTES or not hmac.compare_digest(
                server_proof, _mac(secret, b"server", self.nonce, server_nonce)):
            return proof, ("the peer's tcp data plane could not prove the cluster's shared secret: it runs with "
                           "another key directory (--keys) or none")
        self.key = _mac(secret, b"session", self.nonce, server_nonce)
        return proof, ""

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def tag(self, head: bytes) -> bytes:
        return request_mac(self.key, head)


class ServerSessions:
    """A data server's sessions, by the ZMQ routing identity of each client connection."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self._pending: OrderedDict[bytes, tuple[bytes, bytes]] = OrderedDict()  # ident -> (cn, sn)
        self._live: OrderedDict[bytes, list] = OrderedDict()  # ident -> [K, last seq]

    def challenge(self, ident: bytes, client_nonce: bytes) -> tuple[bytes, bytes]:
        """A fresh server nonce and the server's proof for a client's hello."""
        sn = os.urandom(NONCE_BYTES)
        self._live.pop(ident, None)
        self._pending[ident] = (client_nonce, sn)
        while len(self._pending) > MAX_SESSIONS:
            self._pending.popitem(last=False)
        return sn, _mac(self.keys.secret, b"server", client_nonce, sn)

    def prove(self, ident: bytes, proof: bytes, peer: str = "") -> str:
        """Check a client's proof; '' opens its session, else the reason (logged and counted)."""
        pending = self._pending.pop(ident, None)
        if pending is None:
            return self._refuse("a proof without a hello on this connection", peer)
        cn, sn = pending
        if not hmac.compare_digest(proof, _mac(self.keys.secret, b"client", cn, sn)):
            return self._refuse("wrong handshake proof: the peer does not hold the cluster's shared secret", peer)
        self._live[ident] = [_mac(self.keys.secret, b"session", cn, sn), 0]
        while len(self._live) > MAX_SESSIONS:
            self._live.popitem(last=False)
        return ""

    def check(self, ident: bytes, head: bytes, tag: bytes | None, seq: int, peer: str = "") -> str:
        """'' if ``head`` carries a valid MAC of this connection's session and a new sequence number."""
        session = self._live.get(ident)
        if session is None:
            return self._refuse("a request on a connection that did not complete the data-plane handshake", peer)
        if tag is None or not hmac.compare_digest(tag, request_mac(session[0], head)):
            return self._refuse("a request with a wrong MAC", peer)
        if seq <= session[1]:
            return self._refuse("a replayed request", peer, f" (sequence {seq} after {session[1]})")
        session[1] = seq
        return ""

    @staticmethod
    def _refuse(reason: str, peer: str, detail: str = "") -> str:
        refused(PLANE, reason, peer)
        return f"authentication required: {reason}{detail} (start every peer with the same --keys)"
