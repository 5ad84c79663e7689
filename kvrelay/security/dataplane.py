"""Authentication (and optional encryption) of the tcp data plane: a challenge-response per connection that
yields a session key, then a MAC over every request header under that key; with encryption, AES-256-GCM
over every chunk of bulk bytes under keys derived from it.

What "authenticated" means here.  The data plane moves chunks in the clear at memcpy-like speed; CURVE
on it costs about 5x (kvrelay bench auth).  What must not happen is a peer without the cluster's secret
reading or writing registered memory (the store's pool).  So:

* each data connection opens with a three-message handshake on the ZeroMQ data socket: client nonce ->
  server nonce and the server's proof (HMAC(secret, "server", cn, sn)) -> the client's proof
  (HMAC(secret, "client", cn, sn)).  Both sides prove they hold the secret, the fresh server nonce makes a
  recorded handshake useless on another connection, and both derive the session key
  K = HMAC(secret, "session", cn, sn);
* the bulk bytes then move on a plain TCP socket (tcp_serve.py, tcp_conn.py): the client binds it to its
  session by sending the server nonce and HMAC(K, "bind", sn) as its first message; a session binds one
  socket, once, and a socket that does not bind is refused before anything else is read;
* every request header (op, transfer id, ranges, a sequence number) carries a MAC under K (keyed
  BLAKE2b, RFC 7693: about 1 us a header here, where OpenSSL's HMAC-SHA256 costs about 8):
  without K no request is served, a replayed one is refused (its sequence number is not above the last;
  the ZeroMQ socket and the TCP socket of one session share the count), and a connection whose routing
  identity was taken over after a reconnect has no K.

Not covered by the MAC, on purpose: the bytes of chunks (read replies, write payloads), so an attacker
who can already inject into an established TCP connection could alter them undetected by this layer
(the end-to-end chunk checksum catches accidents, not adversaries).  Where the path is not trusted,
encrypt (``encrypt=True`` on the tcp transport, or ``KVRELAY_TCP_ENCRYPT=1``): the handshake then runs over
CURVE and every chunk of bulk bytes is sealed with AES-256-GCM (`ChunkSealer`/`ChunkOpener`) under a key
per connection and direction derived from K, with a per-direction counter as its nonce (never reused:
each key belongs to one connection and one direction, and its counter only grows) and the chunk's address
(transfer, region, offset, length) as associated data.  A tampered, reordered or replayed chunk fails to
open and is never written.

Owns: the handshake messages' MACs, the per-connection sessions of a server, request MACs, the bind
proof and the chunk ciphers.  Must not touch: sockets or framing (kvrelay/transfer/tcp*.py call in here).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import threading
from collections import OrderedDict

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kvrelay.security.keyfiles import Keys
from kvrelay.security.metrics import refused

NONCE_BYTES = 16
TAG_BYTES = 32
TAGGED = b"\0"  # first byte of a request frame that carries its MAC: TAGGED + MAC + head
MAX_SESSIONS = 65536  # per server: the oldest is forgotten (its connection must handshake again)
PLANE = "tcp-data"
SEAL_BYTES = 16  # the GCM tag after each sealed chunk
_NONCE = struct.Struct("<IQ")  # direction, counter: 96 bits


def bind_mac(key: bytes, sid: bytes) -> bytes:
    """The proof that binds a TCP data socket to the session ``sid`` (the server nonce) whose key is ``key``."""
    return request_mac(key, b"bind" + sid)


def _cipher_key(key: bytes, direction: int) -> bytes:
    return _mac(key, b"aes-256-gcm", direction.to_bytes(4, "little"))


class ChunkSealer:
    """One direction of one connection: seals chunks in order (nonce = direction, counter)."""

    def __init__(self, session_key: bytes, direction: int) -> None:
        self._aead = AESGCM(_cipher_key(session_key, direction))
        self.direction = direction
        self.counter = 0

    def next_nonce(self) -> bytes:
        self.counter += 1
        return _NONCE.pack(self.direction, self.counter)

    def seal_into(self, plain: memoryview, ad: bytes, out: memoryview) -> None:
        """``out`` (len(plain) + SEAL_BYTES) receives the ciphertext and its tag."""
        self._aead.encrypt_into(self.next_nonce(), plain, ad, out)


class ChunkOpener:
    """The other end of a `ChunkSealer`: opens chunks in the same order, so the nonce is never sent."""

    def __init__(self, session_key: bytes, direction: int) -> None:
        self._aead = AESGCM(_cipher_key(session_key, direction))
        self.direction = direction
        self.counter = 0

    def open_into(self, sealed: memoryview, ad: bytes, out: memoryview) -> bool:
        """Decrypt into ``out`` (a scratch buffer: GCM writes before it verifies); False if it does not authenticate."""
        self.counter += 1
        try:
            self._aead.decrypt_into(_NONCE.pack(self.direction, self.counter), sealed, ad, out)
        except InvalidTag:
            return False
        return True


TO_SERVER, TO_CLIENT = 1, 2  # the two directions of a connection


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
        self.server_nonce = b""  # names the session when a TCP data socket binds to it
        self.port = 0            # the server's plain data port, from its answer to the proof

    def answer(self, server_nonce: bytes, server_proof: bytes) -> tuple[bytes, str]:
        """The client's proof for the server's challenge, and an error ('' if the server proved the secret)."""
        secret = self.keys.secret
        proof = _mac(secret, b"client", self.nonce, server_nonce)
        if len(server_nonce) != NONCE_BYTES or not hmac.compare_digest(
                server_proof, _mac(secret, b"server", self.nonce, server_nonce)):
            return proof, ("the peer's tcp data plane could not prove the cluster's shared secret: it runs with "
                           "another key directory (--keys) or none")
        self.key = _mac(secret, b"session", self.nonce, server_nonce)
        self.server_nonce = server_nonce
        return proof, ""

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def tag(self, head: bytes) -> bytes:
        return request_mac(self.key, head)

    def bind_tag(self, sid: bytes) -> bytes:
        return bind_mac(self.key, sid)


class ServerSessions:
    """A data server's sessions, by the ZMQ routing identity of each client connection."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self._pending: OrderedDict[bytes, tuple[bytes, bytes]] = OrderedDict()  # ident -> (cn, sn)
        self._live: OrderedDict[bytes, list] = OrderedDict()  # ident -> [K, last seq]
        self._binds: OrderedDict[bytes, list] = OrderedDict()  # server nonce -> the session a TCP socket may bind
        self._lock = threading.Lock()  # the ZeroMQ thread and the TCP socket threads share the sessions

    def challenge(self, ident: bytes, client_nonce: bytes) -> tuple[bytes, bytes]:
        """A fresh server nonce and the server's proof for a client's hello."""
        sn = os.urandom(NONCE_BYTES)
        with self._lock:
            self._live.pop(ident, None)
            self._pending[ident] = (client_nonce, sn)
            while len(self._pending) > MAX_SESSIONS:
                self._pending.popitem(last=False)
        return sn, _mac(self.keys.secret, b"server", client_nonce, sn)

    def prove(self, ident: bytes, proof: bytes, peer: str = "") -> str:
        """Check a client's proof; '' opens its session, else the reason (logged and counted)."""
        with self._lock:
            pending = self._pending.pop(ident, None)
        if pending is None:
            return self._refuse("a proof without a hello on this connection", peer)
        cn, sn = pending
        if not hmac.compare_digest(proof, _mac(self.keys.secret, b"client", cn, sn)):
            return self._refuse("wrong handshake proof: the peer does not hold the cluster's shared secret", peer)
        record = [_mac(self.keys.secret, b"session", cn, sn), 0]
        with self._lock:
            self._live[ident] = record
            self._binds[sn] = record
            while len(self._live) > MAX_SESSIONS:
                self._live.popitem(last=False)
            while len(self._binds) > MAX_SESSIONS:
                self._binds.popitem(last=False)
        return ""

    def bind(self, sid: bytes, tag: bytes, peer: str = "") -> tuple[list | None, str]:
        """The session a TCP data socket binds to (once) with ``tag`` = bind_mac(K, sid), or the refusal."""
        with self._lock:
            record = self._binds.pop(sid, None)
        if record is None:
            return None, self._refuse("a data connection that did not complete the handshake", peer)
        if not hmac.compare_digest(tag, bind_mac(record[0], sid)):
            return None, self._refuse("a data connection with a wrong bind proof", peer)
        return record, ""

    def check(self, ident: bytes, head: bytes, tag: bytes | None, seq: int, peer: str = "") -> str:
        """'' if ``head`` carries a valid MAC of this connection's session and a new sequence number."""
        session = self._live.get(ident)
        if session is None:
            return self._refuse("a request on a connection that did not complete the data-plane handshake", peer)
        return self.check_record(session, head, tag, seq, peer)

    def check_record(self, session: list, head: bytes, tag: bytes | None, seq: int, peer: str = "") -> str:
        """`check` for a session already looked up (a bound TCP socket holds its own)."""
        if tag is None or not hmac.compare_digest(tag, request_mac(session[0], head)):
            return self._refuse("a request with a wrong MAC", peer)
        with self._lock:
            last = session[1]
            if seq > last:
                session[1] = seq
        if seq <= last:
            return self._refuse("a replayed request", peer, f" (sequence {seq} after {last})")
        return ""

    @staticmethod
    def _refuse(reason: str, peer: str, detail: str = "") -> str:
        refused(PLANE, reason, peer)
        return f"authentication required: {reason}{detail} (start every peer with the same --keys)"
