"""`kvrelay router --workers N`: N router processes on one port (SO_REUSEPORT), the kernel spreading
connections over them, so the router uses N cores.

The parent binds the port first (with SO_REUSEPORT, not listening: it only holds a port picked for
``--port 0``), starts N children with the same flags plus ``--port PORT --reuse-port --workers 1``, waits
for each child's ready file, then writes its own and waits (sigwait: SIGTERM/SIGINT stop every child; a
child that exits, SIGCHLD, stops the others and the parent exits 1).  Each child keeps its own pools, breakers, retries, KV
index and metrics (a scrape of /metrics reaches one of them; their load counts are per process).

Owns: the parent process.  Must not touch: routing (server.py).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from kvrelay.readyfile import wait_ready_file, write_ready_file
from kvrelay.store.process import die_with_parent

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
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="kvrelay-router-") as tmp:
        try:
            for i in range(workers):
                ready = Path(tmp) / f"worker{i}.json"
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "kvrelay.cli", "router", *argv, "--port", str(port), "--workers", "1",
                     "--reuse-port", "--ready-file", str(ready)], stdin=subprocess.DEVNULL,
                    preexec_fn=die_with_parent))
            for i, p in enumerate(procs):
                wait_ready_file(Path(tmp) / f"worker{i}.json", p, 120.0)
        except (ChildProcessError, TimeoutError) as exc:
            print(f"kvrelay router: a worker process did not start: {exc}", file=sys.stderr)
            _stop(procs)
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
        _stop(procs)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, waited)
    if failed and not stopped:
        print(f"kvrelay router: worker process {failed[0].pid} exited with {failed[0].returncode}; stopped the "
              f"others", file=sys.stderr)
        return 1
    return 0


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
