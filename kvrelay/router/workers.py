"""`kvrelay router --workers N`: N router processes on one port (SO_REUSEPORT), the kernel spreading
connections over them, so the router uses N cores.

The parent binds the port first (with SO_REUSEPORT, not listening: it only holds a port picked for
``--port 0``), starts N children with the same flags plus ``--port PORT --reuse-port --workers 1``, waits
for each child's ready file, then writes its own and waits (sigwait: SIGTERM/SIGINT stop every child; a
child that exits, SIGCHLD, stops the others and the parent exits 1).  Each child keeps its own pools, breakers, retries, KV
index and metrics (a scrape of /metrics reaches one of them; their load counts are per process).

Owns: the parent process.  Must not touch: routing (app.py).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path

from kvrelay import proc
from kvrelay.readyfile import write_ready_file

log = logging.getLogger("kvrelay.router")


def run_workers(argv: list[str], host: str, port: int, workers: int, ready_file: str) -> int:
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        holder.bind((host, port))
    except OSError as exc:
        print(f"kvrelay router: cannot serve on --host {host} --port {port}: {exc}", file=sys.stderr)
        return 2
    port = holder.getsockname()[1]
    stopped = False
    procs: list[proc.ChildProcess] = []
    with tempfile.TemporaryDirectory(prefix="kvrelay-router-") as tmp:
        try:
            for i in range(workers):
                procs.append(proc.spawn_kvrelay(
                    ["router", *argv, "--port", str(port), "--workers", "1", "--reuse-port"],
                    name=f"worker {i}", ready_file=Path(tmp) / f"worker{i}.json", die_with_parent=True))
            for p in procs:
                p.wait_ready(120.0)
        except proc.StartError as exc:
            print(f"kvrelay router: a worker process did not start: {exc}", file=sys.stderr)
            proc.stop_all(procs)
            return 1
        holder.close()
        log.info("kvrelay router: %d worker processes serving http://%s:%d", workers, host, port)
        if ready_file:
            write_ready_file(ready_file, {"port": port, "pid": os.getpid(), "url": f"http://{host}:{port}",
                                          "workers": [p.pid for p in procs]})
        waited = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
        signal.pthread_sigmask(signal.SIG_BLOCK, waited)  # taken by sigwait below, not by handlers
        while all(p.poll() is None for p in procs):
            if signal.sigwait(waited) != signal.SIGCHLD:
                stopped = True
                break
        failed = [p for p in procs if p.poll() is not None]
        proc.stop_all(procs)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, waited)
    if failed and not stopped:
        print(f"kvrelay router: worker process {failed[0].pid} exited with {failed[0].returncode}; stopped the "
              f"others", file=sys.stderr)
        return 1
    return 0

