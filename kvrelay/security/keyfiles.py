"""The key directory: writing it (`kvrelay keys DIR`), reading and checking it (`load`), and `Keys`.

Layout (every file mode 0600, the directory 0700)::

    DIR/server.key, DIR/server.key_secret   ZeroMQ CURVE keypair of every server (zmq certificate format)
    DIR/client.key, DIR/client.key_secret   ZeroMQ CURVE keypair of every client
    DIR/secret                              64 hex digits: the shared HMAC secret
    DIR/token                               the HTTP bearer token

Owns: the files and the `Keys` value.  Must not touch: sockets (curve.py does; `Keys` only forwards to it).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth

from kvrelay.security.curve import make_server

FILES = ("server.key", "server.key_secret", "client.key", "client.key_secret", "secret", "token")


class KeysError(ValueError):
    """A key directory that is missing, incomplete, unreadable or too open; the message says the fix."""


@dataclass(frozen=True, eq=False)
class Keys:
    directory: Path
    server_public: bytes  # z85, 40 bytes
    server_secret: bytes = field(repr=False)
    client_public: bytes
    client_secret: bytes = field(repr=False)
    secret: bytes = field(repr=False)  # 32 bytes
    token: str = field(repr=False)

    def server_socket(self, sock: zmq.Socket, plane: str) -> None:
        """Make ``sock`` (before bind) a CURVE server that accepts only this directory's client key; a ZAP
        handler in its context logs and counts every refused peer under ``plane``."""
        make_server(self, sock, plane)

    def client_socket(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (before connect) a CURVE client of a `server_socket` made from the same keys."""
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.client_public
        sock.curve_secretkey = self.client_secret

    def sign(self, *parts: bytes) -> bytes:
        """HMAC-SHA256 with the shared secret over ``parts`` (each length-prefixed, so parts cannot shift)."""
        mac = hmac.new(self.secret, digestmod=hashlib.sha256)
        for p in parts:
            mac.update(len(p).to_bytes(8, "little"))
            mac.update(p)
        return mac.digest()

    def verify(self, mac: bytes, *parts: bytes) -> bool:
        return hmac.compare_digest(mac, self.sign(*parts))

    def check_token(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries this directory's bearer token (constant time)."""
        if not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[len("Bearer "):].strip().encode(), self.token.encode())


def write_keys(directory: str | os.PathLike, force: bool = False) -> Path:
    """Create the key directory's files; KeysError if any exists and ``force`` is false."""
    d = Path(directory)
    existing = [n for n in FILES if (d / n).exists()]
    if existing and not force:
        raise KeysError(f"{d}: {', '.join(existing)} already exist; pass --force to replace them (every process "
                        f"using the old keys must then get the new directory)")
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    old = os.umask(0o077)
    try:
        for n in FILES:
            (d / n).unlink(missing_ok=True)
        for name in ("server", "client"):
            zmq.auth.create_certificates(str(d), name)
        _write(d / "secret", secrets.token_hex(32) + "\n")
        _write(d / "token", secrets.token_urlsafe(32) + "\n")
    finally:
        os.umask(old)
    for n in FILES:
        os.chmod(d / n, 0o600)
    return d


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def load(directory: str | os.PathLike) -> Keys:
    """Read and check a key directory written by `kvrelay keys`; KeysError names what is wrong and the fix."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise KeysError(f"--keys {str(directory)!r}: no such directory; create one with `kvrelay keys {directory}`")
    missing = [n for n in FILES if not (d / n).is_file()]
    if missing:
        raise KeysError(f"--keys {str(d)!r}: missing {', '.join(missing)}; it is not a key directory written by "
                        f"`kvrelay keys DIR` (rewrite it with `kvrelay keys {d} --force`)")
    for n in FILES:
        mode = stat.S_IMODE((d / n).stat().st_mode)
        if mode & 0o077:
            raise KeysError(f"--keys {str(d)!r}: {n} has mode {mode:04o}, readable by others; "
                            f"`chmod 600 {d}/*` and keep it private")
    try:
        server_public, server_secret = zmq.auth.load_certificate(str(d / "server.key_secret"))
        client_public, client_secret = zmq.auth.load_certificate(str(d / "client.key_secret"))
        secret = bytes.fromhex((d / "secret").read_text().strip())
        token = (d / "token").read_text().strip()
    except (OSError, ValueError) as exc:
        raise KeysError(f"--keys {str(d)!r}: cannot read the keys ({exc}); rewrite with `kvrelay keys {d} --force`") \
            from None
    if server_secret is None or client_secret is None or len(secret) < 16 or not token:
        raise KeysError(f"--keys {str(d)!r}: a key file is empty or truncated; rewrite with `kvrelay keys {d} --force`")
    return Keys(d.resolve(), server_public, server_secret, client_public, client_secret, secret, token)
