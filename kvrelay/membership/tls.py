"""etcd over TLS with client certificates: where the certificates lie in a key directory, the client's ssl
context, and the flags an etcd serving them is started with.

``kvrelay keys DIR --etcd-host ADDR`` (kvrelay/security/etcdcerts.py writes them) adds to the key directory::

    DIR/etcd/ca.crt, DIR/etcd/ca.key            the cluster's etcd CA (signs the two below)
    DIR/etcd/server.crt, DIR/etcd/server.key    etcd's certificate, for ADDR (IP or DNS names)
    DIR/etcd/client.crt, DIR/etcd/client.key    every kvrelay process's client certificate

An ``https://`` etcd endpoint is reached with DIR/etcd/client.* and trusts only DIR/etcd/ca.crt, where DIR is
this process's key directory (``--keys DIR``, which sets ``$KVRELAY_KEYS``; read from the environment here
because membership is a base layer below kvrelay.security).  etcd is started with `server_flags`
(``--client-cert-auth``: a client without a certificate signed by that CA is refused at the handshake).
Plain ``http://`` stays loopback-only (etcd.check_endpoint).

Owns: the file names and the ssl context.  Must not touch: writing the certificates (security/etcdcerts.py).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CA", "CLIENT", "CLUSTER_NAME", "KEYS_ENV", "SERVER", "SUBDIR", "EtcdTLS", "server_flags"]

KEYS_ENV = "KVRELAY_KEYS"  # kvrelay.security.config.ENV (not imported: a higher layer)
SUBDIR = "etcd"
CA, SERVER, CLIENT = "ca", "server", "client"
CLUSTER_NAME = "kvrelay-cluster"  # a DNS name every server certificate also holds: Dynamo's TCP planes pin it


@dataclass(frozen=True, slots=True)
class EtcdTLS:
    """The CA and client certificate files a process reaches an https:// etcd with."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def from_keys_dir(cls, directory: str | os.PathLike) -> EtcdTLS:
        """The files in ``directory``/etcd; ValueError naming what is missing and the command that writes it."""
        d = Path(directory).expanduser() / SUBDIR
        tls = cls(d / f"{CA}.crt", d / f"{CLIENT}.crt", d / f"{CLIENT}.key")
        missing = [p.name for p in (tls.ca, tls.cert, tls.key) if not p.is_file()]
        if missing:
            raise ValueError(f"the key directory {str(directory)!r} has no etcd certificates ({', '.join(missing)} "
                             f"missing in {d}): write them with `kvrelay keys {directory} --etcd-host ETCD-ADDRESS`")
        return tls

    @classmethod
    def from_env(cls) -> EtcdTLS:
        """This process's key directory's files (``$KVRELAY_KEYS``); ValueError when keys are off."""
        directory = os.environ.get(KEYS_ENV)
        if not directory:
            raise ValueError("an https:// etcd is reached with the key directory's etcd client certificate: pass "
                             f"--keys DIR (or set {KEYS_ENV}=DIR), written with `kvrelay keys DIR --etcd-host ADDR`")
        return cls.from_keys_dir(directory)

    def ssl_context(self) -> ssl.SSLContext:
        """A client context: trusts only the etcd CA, checks the server's name, presents the client certificate."""
        try:
            ctx = ssl.create_default_context(cafile=str(self.ca))
            ctx.load_cert_chain(str(self.cert), str(self.key))
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load the etcd certificates in {self.ca.parent}: {exc}") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx


def server_flags(keys_dir: str | os.PathLike) -> list[str]:
    """The flags that make etcd serve its clients with DIR/etcd/server.* and require a client certificate
    signed by DIR/etcd/ca.crt (add ``--listen-client-urls https://ADDR:PORT`` and its advertise URL)."""
    d = Path(keys_dir).expanduser().resolve() / SUBDIR
    return ["--client-cert-auth", "--trusted-ca-file", str(d / f"{CA}.crt"),
            "--cert-file", str(d / f"{SERVER}.crt"), "--key-file", str(d / f"{SERVER}.key")]
