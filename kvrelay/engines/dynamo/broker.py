"""`kvrelay dynamo-broker`: the event broker of a Dynamo deployment, bound to 127.0.0.1.

Dynamo's ZeroMQ event plane (KV events, load metrics, active sequences) binds a PUB socket per
publisher on 0.0.0.0 unless ``DYN_ZMQ_BROKER_URL`` names a broker; then publishers connect to its
XSUB socket and subscribers (the frontend's KV router) to its XPUB socket.  This is that broker: an
XSUB/XPUB proxy (pyzmq) on loopback.  It prints ``DYN_ZMQ_BROKER_URL=...`` on its first line (and writes
it to ``--url-file``); give the same value to every worker (``--event-broker``) and to
``python -m dynamo.frontend`` (the environment variable).  Owns: the proxy.  Must not touch: the events.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

import zmq

from kvrelay.engines.dynamo.env import LOOPBACK, broker_url


class EventBroker:
    """An XSUB/XPUB proxy on 127.0.0.1 in a thread; ``url`` is its ``DYN_ZMQ_BROKER_URL``."""

    def __init__(self, xsub_port: int = 0, xpub_port: int = 0) -> None:
        self._ctx = zmq.Context()
        self._xsub = self._ctx.socket(zmq.XSUB)
        self._xpub = self._ctx.socket(zmq.XPUB)
        self._ctl = self._ctx.socket(zmq.PAIR)
        self._ctl_peer = self._ctx.socket(zmq.PAIR)
        self._ctl.bind(f"inproc://kvrelay-broker-{id(self)}")
        self._ctl_peer.connect(f"inproc://kvrelay-broker-{id(self)}")
        for sock in (self._xsub, self._xpub, self._ctl, self._ctl_peer):
            sock.setsockopt(zmq.LINGER, 0)
        self.xsub_port = _bind(self._xsub, xsub_port, "--xsub-port")
        self.xpub_port = _bind(self._xpub, xpub_port, "--xpub-port")
        self.url = broker_url(self.xsub_port, self.xpub_port)
        self._thread = threading.Thread(target=self._run, name="kvrelay-dynamo-broker", daemon=True)

    def start(self) -> "EventBroker":
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            zmq.proxy_steerable(self._xsub, self._xpub, None, self._ctl_peer)
        except zmq.ContextTerminated:
            pass

    def close(self) -> None:
        if self._thread.is_alive():
            self._ctl.send(b"TERMINATE")
            self._thread.join(5)
        for sock in (self._xsub, self._xpub, self._ctl, self._ctl_peer):
            sock.close()
        self._ctx.term()


def _bind(sock: zmq.Socket, port: int, flag: str) -> int:
    if not 0 <= port <= 65535:
        raise ValueError(f"{flag} {port} is outside 0..65535 (0 picks a free port)")
    try:
        if port == 0:
            return int(sock.bind_to_random_port(f"tcp://{LOOPBACK}"))
        sock.bind(f"tcp://{LOOPBACK}:{port}")
        return port
    except zmq.ZMQError as exc:
        raise ValueError(f"{flag}: cannot bind {LOOPBACK}:{port}: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvrelay dynamo-broker", description=__doc__.split("\n\n")[0])
    p.add_argument("--xsub-port", type=int, default=0, help="port publishers connect to (0: a free one)")
    p.add_argument("--xpub-port", type=int, default=0, help="port subscribers connect to (0: a free one)")
    p.add_argument("--url-file", default="", help="also write the DYN_ZMQ_BROKER_URL value to this file")
    args = p.parse_args(argv)
    try:
        broker = EventBroker(args.xsub_port, args.xpub_port)
    except ValueError as exc:
        print(f"kvrelay dynamo-broker: {exc}", file=sys.stderr)
        return 2
    if args.url_file:
        Path(args.url_file).write_text(broker.url + "\n")
    print(f"DYN_ZMQ_BROKER_URL={broker.url}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    broker.start()
    stop.wait()
    broker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
