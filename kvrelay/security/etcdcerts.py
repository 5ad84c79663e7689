"""The key directory's etcd certificates (``kvrelay keys DIR --etcd-host ADDR``): a CA of the cluster's own,
etcd's server certificate for its address(es), and the client certificate every kvrelay process presents.

Written with the ``cryptography`` package (already a dependency: the store's SSD tier), ECDSA P-256, valid
ten years; files mode 0600 in DIR/etcd (mode 0700).  The server certificate is also usable as a client
certificate (extended key usage serverAuth and clientAuth): etcd 3.4's JSON gateway dials etcd's own gRPC
port with it, which ``--client-cert-auth`` checks too.  It also names ``kvrelay-cluster`` (tls.CLUSTER_NAME): the
Dynamo workers' and frontends' TCP servers present it on every host, their clients pinning that name.  The
file layout is kvrelay/membership/tls.py's.

Owns: generating the files.  Must not touch: the rest of the key directory (keyfiles.py) or how clients use
the files (membership/tls.py).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kvrelay.membership.tls import CA, CLIENT, CLUSTER_NAME, SERVER, SUBDIR

__all__ = ["check_hosts", "write_etcd_certs"]

VALID = datetime.timedelta(days=3650)


def check_hosts(hosts: list[str]) -> list[str]:
    """The etcd addresses (IP literals or DNS names) a server certificate is for; ValueError naming a bad one."""
    if not hosts:
        raise ValueError("--etcd-host: give the address etcd serves its clients on (e.g. 198.18.0.1)")
    for h in hosts:
        if not h or any(c in h for c in "/: ") and not _ip(h):
            raise ValueError(f"--etcd-host {h!r}: give an IP address or a DNS name, without scheme or port")
    return hosts


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kvrelay"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: ec.EllipticCurvePrivateKey,
          ca: bool, usages: list[x509.ObjectIdentifier], sans: list[x509.GeneralName]) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + VALID)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=not ca,
                                      data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                                      encipher_only=False, decipher_only=False), critical=True))
    if usages:
        b = b.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(signer, hashes.SHA256())


def write_etcd_certs(keys_dir: str | os.PathLike, hosts: list[str]) -> Path:
    """Write (replacing) DIR/etcd's CA, server certificate for ``hosts`` and client certificate; the folder."""
    d = Path(keys_dir).expanduser() / SUBDIR
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    sans: list[x509.GeneralName] = []
    for h in check_hosts(hosts):
        ip = _ip(h)
        sans.append(x509.IPAddress(ip) if ip is not None else x509.DNSName(h))
    if CLUSTER_NAME not in hosts:  # Dynamo's request plane servers present this certificate too (engines/dynamo/env.py)
        sans.append(x509.DNSName(CLUSTER_NAME))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _cert("kvrelay etcd CA", ca_key, _name("kvrelay etcd CA"), ca_key, True, [], [])
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _cert(f"etcd {hosts[0]}", server_key, ca_cert.subject, ca_key, False,
                   [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], sans)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _cert("kvrelay", client_key, ca_cert.subject, ca_key, False, [ExtendedKeyUsageOID.CLIENT_AUTH], [])
    for name, key, cert in ((CA, ca_key, ca_cert), (SERVER, server_key, server), (CLIENT, client_key, client)):
        _write(d / f"{name}.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
        _write(d / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM))
    return d


def _write(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
