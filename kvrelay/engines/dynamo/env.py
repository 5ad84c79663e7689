"""The environment a kvrelay process sets before NVIDIA Dynamo's runtime starts in it: file discovery,
loopback-only listeners, and the address of the event broker.

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


def dynamo_env(discovery_dir: str | Path, event_broker: str, system_port: int | None = None) -> dict[str, str]:
    """The ``DYN_*`` variables of a loopback-only Dynamo process using file discovery in ``discovery_dir``."""
    d = Path(discovery_dir)
    if not d.is_dir():
        raise ValueError(f"--discovery-dir {d} is not a directory; create it (every worker and the frontend of "
                         "one deployment name the same directory)")
    env = {name: LOOPBACK for name in _HOST_VARS}
    env |= {"DYN_DISCOVERY_BACKEND": "file", "DYN_FILE_KV": str(d.resolve()), "DYN_REQUEST_PLANE": "tcp",
            "DYN_EVENT_PLANE": "zmq", "DYN_ZMQ_BROKER_URL": check_broker_url(event_broker),
            "DYN_HTTP_HOST": LOOPBACK}
    if system_port is not None:
        if not 1 <= system_port <= 32767:  # Dynamo parses DYN_SYSTEM_PORT as a signed 16-bit number
            raise ValueError(f"--metrics-port {system_port} is outside 1..32767 (Dynamo's limit)")
        env |= {"DYN_SYSTEM_PORT": str(system_port), "DYN_SYSTEM_ENABLED": "true"}
    else:
        env["DYN_SELF_HOST_METADATA"] = "0"  # no status server: the model card goes to the discovery directory
    return env


def apply(env: dict[str, str]) -> None:
    os.environ.update(env)
