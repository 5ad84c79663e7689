"""Encryption of the SSD tier at rest: AES-256-GCM keys from a key file, sealing and opening chunk payloads.

Owns: the key file (format, permission check, ``kvrelay store keygen``) and `KeyRing` (seal/open with a key
id per record).  Must not touch: the record layout (ssd_format.py), files of the tier (ssd.py) or the pool.

Key file: one key a line, ``ID HEX`` (a key id 1..2**32-1 and 64 hex digits, 32 random bytes); ``#`` starts a
comment.  The last line is the current key: new records are sealed with it; every key in the file opens
the records written under it.  Rotation: append a key (``kvrelay store keygen --at-rest-key FILE``) and
restart the store; drop an old key only once no record needs it (``kvrelay_store_ssd_records{key_id}``).
The file must be a regular file of mode 0600 or stricter (no group or other bits): the store refuses to
start otherwise.

Each record is sealed with a fresh random 96-bit nonce (stored in its head with the tag), and the chunk's
identity -- its key id string and tenant -- as associated data: a record moved to another chunk's place,
or its bytes swapped with another's, fails to open (InvalidTag) and is treated as corrupt.
"""

from __future__ import annotations

import os
import secrets
import stat

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import AEADEncryptionContext, Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32
MAX_KEY_ID = 2**32 - 1


def associated_data(kid: str, tenant: str) -> bytes:
    """What a record's ciphertext is bound to: the chunk's id and its tenant."""
    return b"kvrelay-ssd-v1|" + kid.encode() + b"|" + tenant.encode()


def _check_mode(path: str) -> None:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ValueError(f"--at-rest-key {path}: cannot read it ({exc.strerror}); create it with "
                         f"`kvrelay store keygen --at-rest-key {path}`") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"--at-rest-key {path}: not a regular file")
    if st.st_mode & 0o077:
        raise ValueError(f"--at-rest-key {path}: mode {stat.S_IMODE(st.st_mode):04o} lets other users read the "
                         f"keys; chmod 600 {path}")


def read_keys(path: str) -> list[tuple[int, bytes]]:
    """The (id, key) lines of a key file, in file order; ValueError naming the file and line otherwise."""
    _check_mode(path)
    out: list[tuple[int, bytes]] = []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError("expected two fields")
                kid, key = int(parts[0]), bytes.fromhex(parts[1])
            except ValueError:
                raise ValueError(f"--at-rest-key {path} line {n}: expected 'ID HEX' (a key id and {2 * KEY_BYTES} "
                                 f"hex digits)") from None
            if not 1 <= kid <= MAX_KEY_ID or len(key) != KEY_BYTES:
                raise ValueError(f"--at-rest-key {path} line {n}: key id must be 1..{MAX_KEY_ID} and the key "
                                 f"{KEY_BYTES} bytes ({2 * KEY_BYTES} hex digits), got id {kid} and {len(key)} bytes")
            if any(k == kid for k, _ in out):
                raise ValueError(f"--at-rest-key {path} line {n}: key id {kid} appears twice")
            out.append((kid, key))
    if not out:
        raise ValueError(f"--at-rest-key {path}: no key in it; add one with `kvrelay store keygen --at-rest-key {path}`")
    return out


def keygen(path: str) -> int:
    """Append a fresh random key to the key file (created with mode 0600); returns its id (the new current key)."""
    ids = [k for k, _ in read_keys(path)] if os.path.exists(path) else []
    kid = max(ids, default=0) + 1
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, f"{kid} {secrets.token_hex(KEY_BYTES)}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return kid


class KeyRing:
    """The keys of a key file: ``current`` seals, every key opens."""

    def __init__(self, keys: list[tuple[int, bytes]]) -> None:
        if not keys:
            raise ValueError("a KeyRing needs at least one key")
        self._aead = {kid: AESGCM(key) for kid, key in keys}
        self._current_key = keys[-1][1]
        self.current = keys[-1][0]

    @classmethod
    def load(cls, path: str) -> "KeyRing":
        return cls(read_keys(path))

    @property
    def ids(self) -> list[int]:
        return sorted(self._aead)

    def sealer(self, ad: bytes) -> tuple[int, bytes, AEADEncryptionContext]:
        """(key id, nonce, an encryptor bound to ``ad``) for sealing a payload piece by piece (ssd.py overlaps
        each piece's encryption with the previous piece's write); its ``tag`` after ``finalize()``."""
        nonce = os.urandom(NONCE_BYTES)
        enc = Cipher(algorithms.AES(self._current_key), modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(ad)
        return self.current, nonce, enc

    def open(self, key_id: int, nonce: bytes, sealed: memoryview, ad: bytes, out: memoryview) -> bool:
        """Decrypt ``sealed`` (ciphertext then its TAG_BYTES tag) into ``out``; False if the key is unknown or
        the record does not authenticate (tampered, moved, or sealed for another chunk)."""
        aead = self._aead.get(key_id)
        if aead is None or len(sealed) < TAG_BYTES:
            return False
        try:
            aead.decrypt_into(nonce, sealed, ad, out[:len(sealed) - TAG_BYTES])
        except InvalidTag:
            return False
        return True
