"""`kvrelay store`: start the store daemon (pool, SSD recovery, transports, control loop, metrics).

Owns: process wiring, signals and the ready file.  Must not touch: store rules (core.py), the protocol
(protocol.py) or transports' internals (it only creates endpoints and registers the pool with them).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

import zmq

from kvrelay import security
from kvrelay.readyfile import write_ready_file
from kvrelay.store import register
from kvrelay.store.config import from_args, add_arguments, StoreConfig
from kvrelay.store.core import StoreCore
from kvrelay.store.pool import sweep_stale_pools
from kvrelay.store.protocol import STORE_COMPAT
from kvrelay.store.metrics import StoreMetrics
from kvrelay.store.server import StoreServer

log = logging.getLogger("kvrelay.store")


def open_endpoints(cfg: StoreConfig, core: StoreCore) -> tuple[dict[str, dict], list]:
    """Create one transport endpoint per configured remote transport and register the pool with it."""
    endpoints: dict[str, dict] = {}
    opened = []
    for name in cfg.transports:
        if name == "shm":
            continue  # same host: clients map the pool directly
        try:
            from kvrelay.transfer import create_transport
        except ImportError as exc:
            raise ValueError(f"transport {name!r} requested but kvrelay.transfer.create_transport is not "
                             f"available ({exc}); serve --transports shm") from None
        t = create_transport(name, "kvrelay-store", STORE_COMPAT, cfg.host, 0)
        region = t.register(core.pool.mm)
        opened.append(t)
        endpoints[name] = {"address": t.address, "region_id": region.region_id}
    return endpoints, opened


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if words and words[0] in ("purge", "keygen"):  # operator commands (admin.py), not the daemon
        from kvrelay.store.admin import main as admin
        return admin(words)
    parser = argparse.ArgumentParser(prog="kvrelay store", description=__doc__.split("\n\n")[0],
                                     epilog="Also: kvrelay store purge --tenant T --store ADDR; "
                                            "kvrelay store keygen --at-rest-key FILE (each has --help).")
    add_arguments(parser)
    parser.add_argument("--log-level", default=os.environ.get("KVRELAY_LOG_LEVEL", "INFO"))
    register.add_arguments(parser)
    security.add_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    del args.log_level
    keys_dir = args.keys
    del args.keys
    try:
        security.configure(keys_dir)  # before the config: a non-loopback --host needs keys
        membership = register.take(args)
        cfg = from_args(args)
    except ValueError as exc:
        print(f"kvrelay store: {exc}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    for name in sweep_stale_pools():
        log.info("removed /dev/shm/%s (and its directory), the pool of a store daemon that is gone", name)
    holder: dict = {}
    # health first: /healthz answers and /readyz says "recovering" while the SSD index is replayed
    metrics = StoreMetrics(lambda: holder["core"].stats() if "core" in holder else {})
    try:
        mport = metrics.serve(cfg.metrics_port) if cfg.metrics_port >= 0 else -1
    except OSError as exc:
        print(f"kvrelay store: cannot serve metrics on port {cfg.metrics_port}: {exc}", file=sys.stderr)
        metrics.close()
        return 2
    try:
        core = holder["core"] = StoreCore(cfg)
    except (ValueError, OSError) as exc:
        print(f"kvrelay store: cannot start: {exc}", file=sys.stderr)
        metrics.close()
        return 2
    transports: list = []
    server = None
    registration = None
    try:
        try:
            endpoints, transports = open_endpoints(cfg, core)
            server = StoreServer(core, metrics, cfg.host, cfg.port, endpoints, local=cfg.local_socket)
        except (ValueError, OSError, RuntimeError, zmq.ZMQError) as exc:
            print(f"kvrelay store: cannot start: {exc} (control port {cfg.port})", file=sys.stderr)
            return 2

        def stop(signum, frame) -> None:
            server.running = False
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        metrics.ready = True
        info = {"address": server.address, "metrics_port": mport, "pid": os.getpid(), "pool_name": cfg.pool_name,
                "recovered": core.recovered, "recover_dropped": core.recover_dropped,
                "startup_seconds": time.monotonic() - t0, "endpoints": endpoints,
                "ssd_direct": bool(core.ssd and core.ssd.direct)}
        if core.events_publisher is not None:  # KV events: where subscribers connect (kvrelay.events)
            info["events"] = core.events_publisher.endpoint
            info["events_replay"] = core.events_publisher.replay_endpoint
        log.info("store serving %s (metrics :%s, pool %d bytes, recovered %d chunks, dropped %d) in %.2fs",
                 server.address, mport, cfg.pool_size, core.recovered, core.recover_dropped, info["startup_seconds"])
        registration = membership.start(server.address, {"metrics_port": str(mport), **{
            f"{name}_address": str(e["address"]) for name, e in endpoints.items()}})
        if cfg.ready_file:
            write_ready_file(cfg.ready_file, info)
        server.serve_forever()
    finally:
        if registration is not None:
            registration.stop()
        if server is not None and not server.sock.closed:
            server.sock.close()
        metrics.close()
        for t in transports:
            t.close()
        core.close()
    return 0
