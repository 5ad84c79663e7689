"""Authentication for kvrelay's planes: one key directory, shared by every process of a cluster.

``kvrelay keys DIR`` writes it once (keyfiles.py); copy DIR to every host.  It holds a ZeroMQ CURVE
keypair for servers and one for clients (control planes: store, events, transport handshakes), a
shared secret (HMAC: the tcp data plane's challenge-response, signed ``kv_transfer_params``) and an
HTTP bearer token (router and engines).  Every command takes ``--keys DIR``, or ``KVRELAY_KEYS=DIR``
from the environment; with keys, a process may bind a non-loopback address (`check_loopback`).

API::

    keys = kvrelay.security.load("DIR")          # -> Keys (KeysError, a ValueError, names what is wrong)
    kvrelay.security.configure("DIR" or None)    # this process's keys (and KVRELAY_KEYS for its children)
    kvrelay.security.current()                   # -> Keys | None: configured, else from $KVRELAY_KEYS
    with kvrelay.security.using(keys): ...       # current() is keys (or None) in the block (tests)
    kvrelay.security.add_argument(parser)        # the --keys DIR flag every command takes
    kvrelay.security.check_loopback(host, what)  # ValueError: non-loopback without keys (also kvrelay.serving's)
    keys.server_socket(sock, "store")            # CURVE server + ZAP: unknown clients refused, logged, counted
    keys.client_socket(sock)                     # CURVE client of a server_socket
    keys.sign(b"..."), keys.verify(b"...", mac)  # HMAC-SHA256 with the shared secret

Refusals are counted in ``kvrelay_auth_refused_total{plane, reason}`` (metrics.py).

Owns: key files, socket authentication setup, HMAC helpers, bearer-token checks.  Must not touch: what
the authenticated sockets carry.
"""

from __future__ import annotations

from kvrelay.security.keyfiles import Keys, KeysError, load, write_keys
from kvrelay.security.config import ENV, LOOPBACK, add_argument, check_loopback, configure, current, using

__all__ = ["ENV", "LOOPBACK", "Keys", "KeysError", "add_argument", "check_loopback", "configure", "current", "load",
           "using", "write_keys"]
