"""The environment a kvrelay process sets before NVIDIA Dynamo's runtime starts in it: file discovery or
etcd discovery, loopback-only listeners, and the address of the event broker.

Discovery is a directory (``DYN_DISCOVERY_BACKEND=file``, ``DYN_FILE_KV``) or an etcd URL
(``DYN_DISCOVERY_BACKEND=etcd``, ``ETCD_ENDPOINTS``): http:// on loopback, or https:// with the key
directory's etcd client certificate (kvrelay/membership/tls.py), given to Dynamo's etcd client as
``ETCD_AUTH_CA``, ``ETCD_AUTH_CLIENT_CERT`` and ``ETCD_AUTH_CLIENT_KEY`` (the variables ai-dynamo 1.6.1 reads;
it takes their values as the PEM text, not as paths, so the client key is in the worker's environment:
readable by its own user and root only, as the key file is).  With those certificates in the key directory,
Dynamo's TCP request plane and response streams run mutual TLS (``DYN_TCP_TLS_*``), and may then bind a
host's address instead of loopback (--advertise-host): a worker on one host, the frontend on another.

Dynamo reads its settings from ``DYN_*`` variables when its runtime is created, so they are set here,
before that.  Left alone, its event plane binds ZeroMQ PUB sockets on 0.0.0.0; with
``DYN_ZMQ_BROKER_URL`` every publisher *connects* to a broker instead (kvrelay.engines.dynamo.broker,
bound to 127.0.0.1), so nothing of a worker listens beyond loopback.  Owns: those variables.  Must not
touch: Dynamo's installed files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from kvrelay.membership import EtcdTLS, check_endpoint
from kvrelay.membership.tls import CLUSTER_NAME, KEYS_ENV, SUBDIR

LOOPBACK = "127.0.0.1"
# the request plane's server, its response streams, the event plane's advertised address, the status server
_HOST_VARS = ("DYN_TCP_RPC_HOST", "DYN_TCP_RESPONSE_STREAM_HOST", "DYN_EVENT_PLANE_HOST", "DYN_SYSTEM_HOST")
_BROKER_RE = re.compile(r"^xsub=tcp://127\.0\.0\.1:\d+,xpub=tcp://127\.0\.0\.1:\d+$")


def broker_url(xsub_port: int, xpub_port: int) -> str:
    """``DYN_ZMQ_BROKER_URL`` for a broker on 127.0.0.1 (publishers connect to XSUB, subscribers to XPUB)."""
    return f"xsub=tcp://{LOOPBACK}:{xsub_port},xpub=tcp://{LOOPBACK}:{xpub_port}"


def check_broker_url(url: str) -> str:
    if not _BROKER_RE.match(url):
        raise ValueError(f"--event-broker {url!r} is not 'xsub=tcp://127.0.0.1:PORT,xpub=tcp://127.0.0.1:PORT' "
                         "(what `kvrelay dynamo-broker` prints); without a broker Dynamo's event plane would bind "
                         "0.0.0.0")
    return url


def is_etcd(discovery: str | Path) -> bool:
    """Whether ``discovery`` (a worker's --etcd or --discovery-dir) names etcd rather than a directory."""
    return str(discovery).startswith(("http://", "https://"))


def discovery_env(discovery: str | Path) -> dict[str, str]:
    """The ``DYN_*``/``ETCD_*`` variables of file discovery in a directory, or of etcd discovery at a URL."""
    if is_etcd(discovery):
        url = check_endpoint(str(discovery), "--etcd")
        variables = {"DYN_DISCOVERY_BACKEND": "etcd", "ETCD_ENDPOINTS": url}
        if url.startswith("https://"):
            tls = EtcdTLS.from_env()
            try:  # the PEM text itself, not a path: Dynamo hands the values to Certificate/Identity::from_pem
                variables |= {"ETCD_AUTH_CA": tls.ca.read_text(), "ETCD_AUTH_CLIENT_CERT": tls.cert.read_text(),
                              "ETCD_AUTH_CLIENT_KEY": tls.key.read_text()}
            except OSError as exc:
                raise ValueError(f"--etcd {url}: cannot read the etcd certificates: {exc}") from None
        return variables
    d = Path(discovery)
    if not d.is_dir():
        raise ValueError(f"--discovery-dir {d} is not a directory; create it (every worker and the frontend of "
                         "one deployment name the same directory)")
    return {"DYN_DISCOVERY_BACKEND": "file", "DYN_FILE_KV": str(d.resolve())}


def tcp_tls_env() -> dict[str, str]:
    """Mutual TLS on Dynamo's TCP request plane and response streams, from the key directory's certificates
    (``kvrelay keys DIR --etcd-host ...``: every server presents DIR/etcd/server.crt, which also names
    ``kvrelay-cluster``, and requires a client certificate of DIR/etcd/ca.crt); {} when keys are off or hold none."""
    keys = os.environ.get(KEYS_ENV)
    d = Path(keys) / SUBDIR if keys else None
    if d is None or not (d / "server.crt").is_file():
        return {}
    return {"DYN_TCP_TLS_CERT_PATH": str(d / "server.crt"), "DYN_TCP_TLS_KEY_PATH": str(d / "server.key"),
            "DYN_TCP_TLS_CLIENT_CA_CERT_PATH": str(d / "ca.crt"), "DYN_TCP_TLS_CA_CERT_PATH": str(d / "ca.crt"),
            "DYN_TCP_TLS_CLIENT_CERT_PATH": str(d / "client.crt"),
            "DYN_TCP_TLS_CLIENT_KEY_PATH": str(d / "client.key"), "DYN_TCP_TLS_SERVER_NAME": CLUSTER_NAME}


def dynamo_env(discovery: str | Path, event_broker: str, system_port: int | None = None,
               host: str = LOOPBACK) -> dict[str, str]:
    """The ``DYN_*`` variables of a Dynamo process discovering through ``discovery`` (a file discovery
    directory, or an etcd URL).  Its TCP servers (a worker's request plane, a frontend's response streams)
    bind ``host``: loopback, or another address only with mutual TLS from the key directory (`tcp_tls_env`);
    everything else stays on loopback."""
    tls = tcp_tls_env()
    if host not in ("127.0.0.1", "localhost", "::1") and not tls:
        raise ValueError(f"--advertise-host {host}: Dynamo's TCP planes leave loopback only with mutual TLS: pass "
                         f"--keys DIR (or {KEYS_ENV}) holding the certificates of `kvrelay keys DIR --etcd-host ...`")
    env = {name: LOOPBACK for name in _HOST_VARS} | discovery_env(discovery) | tls
    env |= {"DYN_TCP_RPC_HOST": host, "DYN_TCP_RESPONSE_STREAM_HOST": host}
    env |= {"DYN_REQUEST_PLANE": "tcp", "DYN_EVENT_PLANE": "zmq", "DYN_ZMQ_BROKER_URL": check_broker_url(event_broker),
            "DYN_HTTP_HOST": LOOPBACK}
    if system_port is not None:
        if not 1 <= system_port <= 32767:  # Dynamo parses DYN_SYSTEM_PORT as a signed 16-bit number
            raise ValueError(f"--metrics-port {system_port} is outside 1..32767 (Dynamo's limit)")
        env |= {"DYN_SYSTEM_PORT": str(system_port), "DYN_SYSTEM_ENABLED": "true"}
    if system_port is None or host != LOOPBACK:  # no status server, or one other hosts cannot reach (loopback):
        env["DYN_SELF_HOST_METADATA"] = "0"  # the model card goes to the discovery backend
    return env


def apply(env: dict[str, str]) -> None:
    os.environ.update(env)
