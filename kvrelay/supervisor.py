"""Supervision of `kvrelay up`'s kvrelay processes (store, engines, router): start them, wait until they
are ready, and restart one that dies, with backoff.

Owns: spawning (through kvrelay.proc: the ready-file convention; each child in its own session, sent
SIGTERM if `kvrelay up` dies), the restart policy (`Backoff`), the loop that notices exits (woken by SIGCHLD, SIGINT, SIGTERM),
stopping everything, and the state file `kvrelay status` reads (written through upstate.py on every
change).  A restarted process gets the ports its first run picked, so its peers reconnect by themselves.
A process that exits because `kvrelay up` is stopping is not restarted.  A server that is not a `kvrelay`
subcommand (a vLLM server) is supervised the same way through the `Server` protocol (`spawn_server`): it
respawns itself and says when it is ready (no ready file); whatever is left of a dead child's process group
(vLLM's EngineCore) is killed before it is restarted.  Must not touch: what the processes do, or which
processes run with which flags (launcher.py).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from kvrelay import proc, upstate

log = logging.getLogger("kvrelay.up")
STARTING_POLL_S = 0.05  # a starting child announces itself by a file: nothing to wait on but the file


@dataclass(slots=True)
class Backoff:
    """When to restart a process that exited: ``initial`` seconds, times ``factor`` per crash in a row, at
    most ``maximum``.  A run of ``healthy_after`` seconds (since it was ready) resets the series; after
    ``max_restarts`` restarts in a row without such a run, the process is given up."""

    initial: float = 0.5
    factor: float = 2.0
    maximum: float = 10.0
    healthy_after: float = 30.0
    max_restarts: int = 8
    streak: int = 0  # exits in a row, none after a healthy run

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum or self.factor < 1 or self.healthy_after <= 0:
            raise ValueError(f"backoff {self.initial}s x{self.factor} up to {self.maximum}s, reset after "
                             f"{self.healthy_after}s: needs 0 < initial <= maximum, factor >= 1, healthy_after > 0")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0 (0: never restart), got {self.max_restarts}")

    def delay(self, uptime: float) -> float | None:
        """Seconds to wait before restarting a process that was up ``uptime`` seconds; None: give it up."""
        self.streak = 1 if uptime >= self.healthy_after else self.streak + 1
        if self.streak > self.max_restarts:
            return None
        return min(self.maximum, self.initial * self.factor ** (self.streak - 1))


class Server(Protocol):
    """A supervised process that is not a `kvrelay` subcommand (kvrelay.engines.vllm.process.VllmServer)."""

    def respawn(self, *, log_mode: str, log_header: str, die_with_parent: bool) -> proc.ChildProcess:
        """Start a run (in its own session, logging to the child's log): its process."""
        ...

    def ready_info(self) -> dict[str, Any] | None:
        """What it offers once ready (``url``, ``port``, ``health_url``; ``events``...), else None; a short wait."""
        ...


__all__ = ["Backoff", "Child", "Server", "Supervisor", "pin_ports"]  # `Supervisor.wait_ready` raises kvrelay.proc.StartError
# (``code``: the exit code, None: still running; ``line``: the log's last line, where a kvrelay process that exits
# with code 2 printed its configuration error)


@dataclass(eq=False)
class Child:
    name: str
    args: list[str]  # the `kvrelay` subcommand and its flags; ports pinned once the first run picked them
    workdir: Path
    backoff: Backoff
    on_exit: Callable[[], None] | None = None  # after each exit (e.g. remove what a killed store left behind)
    timeout: float = 120.0  # to become ready, at each start
    process: proc.ChildProcess | None = None  # the current run
    info: dict = field(default_factory=dict)  # its ready file
    state: str = "starting"  # starting, running, waiting (to be restarted), failed (given up), stopped
    restarts: int = 0
    started: float = 0.0  # wall clock of the last spawn
    spawned: float = 0.0  # monotonic, of the last spawn
    ready_at: float = 0.0  # monotonic, when it last became ready
    last_exit: int | None = None
    restart_at: float = 0.0
    server: Server | None = None  # not a `kvrelay` subcommand: it spawns itself and reports its readiness

    @property
    def popen(self) -> subprocess.Popen[bytes] | None:
        return self.process.popen if self.process is not None else None

    @property
    def ready_file(self) -> Path:
        return self.workdir / f"{self.name}.ready.json"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def snapshot(self) -> dict[str, Any]:
        info = self.info
        address = info.get("address") or info.get("url", "")
        if "health_url" in info:
            health = info["health_url"]
        elif "address" in info:
            health = f"http://127.0.0.1:{info['metrics_port']}/healthz" if info.get("metrics_port", -1) > 0 else ""
        else:
            health = f"{info['url']}/healthz" if "url" in info else ""
        return {"name": self.name, "pid": self.popen.pid if self.popen else None, "state": self.state,
                "restarts": self.restarts, "started": self.started, "last_exit": self.last_exit,
                "address": address, "health_url": health, "log": str(self.log_path), "supervised": True,
                **({k: info.get(k) for k in ("events", "events_replay")} if "events" in info else {})}


def pin_ports(args: list[str], info: dict) -> list[str]:
    """``args`` with the ports a first run picked (``--port 0``) written in, from its ready file."""
    ports: dict[str, str] = {}
    if "address" in info:  # the store: tcp://127.0.0.1:PORT and a metrics port
        ports["--port"] = info["address"].rsplit(":", 1)[1]
        if info.get("metrics_port", -1) > 0:
            ports["--metrics-port"] = str(info["metrics_port"])
        for flag, name in (("--events", "events"), ("--events-replay", "events_replay")):
            if info.get(name):  # KV events: a restarted store publishes where its subscribers reconnect
                ports[flag] = info[name]
    elif "port" in info:  # an HTTP process (engine, router)
        ports["--port"] = str(info["port"])
    out = list(args)
    for flag, value in ports.items():
        if flag in out:
            out[out.index(flag) + 1] = value
        else:
            out += [flag, value]
    return out


class Supervisor:
    def __init__(self, workdir: Path, verbose: bool = False, backoff: Backoff | None = None) -> None:
        self.workdir = workdir
        self.verbose = verbose
        self.backoff = backoff or Backoff()
        self.children: list[Child] = []
        self.external: list[dict[str, Any]] = []  # processes shown by `kvrelay status` but not restarted here
        self.started = time.time()

    # ---- starting --------------------------------------------------------------------------------
    def spawn(self, name: str, args: list[str], *, on_exit: Callable[[], None] | None = None,
              timeout: float = 120.0) -> Child:
        """Start a `kvrelay` process without waiting for it (then `wait_ready`)."""
        b = self.backoff
        child = Child(name, list(args), self.workdir, Backoff(b.initial, b.factor, b.maximum, b.healthy_after,
                                                              b.max_restarts), on_exit, timeout)
        self.children.append(child)
        self._spawn(child)
        return child

    def spawn_server(self, name: str, server: Server, *, timeout: float = 600.0) -> Child:
        """Start ``server`` (its log: ``WORKDIR/{name}.log``) without waiting for it (then `wait_ready`); it is
        restarted like the `kvrelay` processes."""
        b = self.backoff
        child = Child(name, [], self.workdir, Backoff(b.initial, b.factor, b.maximum, b.healthy_after,
                                                      b.max_restarts), None, timeout, server=server)
        self.children.append(child)
        self._spawn(child)
        return child

    def wait_ready(self, child: Child) -> dict:
        """Wait for a child `spawn` started; StartError (with its exit code and log tail) if it fails."""
        assert child.process is not None
        if child.server is not None:  # nothing to wait on but its health endpoint
            info = child.process.wait_until(child.server.ready_info, child.timeout, interval=0.5, what="healthy")
        else:  # StartError: exited or not ready in time, with its log
            info = child.process.wait_ready(child.timeout)
        self._ready(child, info)
        return info

    def start(self, name: str, args: list[str], *, on_exit: Callable[[], None] | None = None,
              timeout: float = 120.0) -> dict:
        return self.wait_ready(self.spawn(name, args, on_exit=on_exit, timeout=timeout))

    def _spawn(self, child: Child) -> None:
        header = (f"\n--- kvrelay up: restart {child.restarts} of {child.name} at {time.strftime('%H:%M:%S')} ---\n"
                  if child.restarts else "")
        # the ready file is removed first: an earlier run's must not pass for this one's; a restart keeps the
        # crash's log
        if child.server is not None:
            child.process = child.server.respawn(log_mode="ab" if child.restarts else "wb", log_header=header,
                                                 die_with_parent=True)
        else:
            child.process = proc.spawn_kvrelay(child.args, name=child.name, ready_file=child.ready_file,
                                               log=proc.TO_STDOUT if self.verbose else child.log_path,
                                               log_mode="ab" if child.restarts else "wb", log_header=header,
                                               session=True, die_with_parent=True)
        child.state, child.started, child.spawned = "starting", time.time(), time.monotonic()
        self.write_state()

    def _ready(self, child: Child, info: dict) -> None:
        child.info, child.state, child.ready_at = info, "running", time.monotonic()
        if child.server is None:
            child.args = pin_ports(child.args, info)
        if child.restarts:
            log.info("%s is back (restart %d, pid %d, %.1fs after its spawn)", child.name, child.restarts,
                     info.get("pid", 0), child.ready_at - child.spawned)
        self.write_state()

    # ---- supervising -----------------------------------------------------------------------------
    def step(self) -> float | None:
        """Notice exits, readiness and due restarts; seconds until there is something to check (None: until
        a signal)."""
        wait: float | None = None
        for c in self.children:
            now = time.monotonic()
            assert c.popen is not None
            if c.state == "starting":
                assert c.process is not None
                info = c.server.ready_info() if c.server is not None else c.process.ready()
                if info is not None:
                    self._ready(c, info)
                elif c.popen.poll() is not None:
                    self._exited(c, now)
                elif now - c.spawned > c.timeout:
                    log.warning("%s was not ready within %.0fs; killing it", c.name, c.timeout)
                    self._kill(c)
                    self._exited(c, now)
            elif c.state == "running" and c.popen.poll() is not None:
                self._exited(c, now)
            if c.state == "waiting" and now >= c.restart_at:
                c.restarts += 1
                self._spawn(c)
            due = {"starting": STARTING_POLL_S, "waiting": c.restart_at - now}.get(c.state)
            if due is not None:
                wait = due if wait is None else min(wait, due)
        return wait

    def _exited(self, c: Child, now: float) -> None:
        assert c.popen is not None
        code = c.popen.returncode
        assert c.process is not None
        if c.process.session:  # what is left of its group (a vLLM server's EngineCore and Worker) goes with it
            c.process.kill()
        uptime = now - c.ready_at if c.state == "running" else 0.0
        c.last_exit = code
        if c.on_exit is not None:
            c.on_exit()
        delay = c.backoff.delay(uptime)
        if delay is None:
            c.state = "failed"
            log.error("%s exited with code %s; giving it up: %d restarts in a row, none of which lasted %.0fs "
                      "(its log: %s)", c.name, code, c.backoff.max_restarts, c.backoff.healthy_after, c.log_path)
        else:
            c.state, c.restart_at = "waiting", now + delay
            log.warning("%s (pid %d) exited with code %s after %.1fs up; restarting it in %.1fs", c.name,
                        c.popen.pid, code, uptime, delay)
        self.write_state()

    def supervise(self) -> int:
        """Keep the children up until SIGINT or SIGTERM; the signal's number."""
        got: list[int] = []
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        handlers = {signal.SIGINT: lambda s, f: got.append(s), signal.SIGTERM: lambda s, f: got.append(s),
                    signal.SIGCHLD: lambda s, f: None}
        old = {sig: signal.signal(sig, h) for sig, h in handlers.items()}
        old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)  # a signal makes the select below return
        try:
            while not got:
                wait = self.step()
                if got:
                    break
                select.select([r], [], [], wait)
                try:
                    os.read(r, 4096)
                except BlockingIOError:
                    pass
        finally:
            signal.set_wakeup_fd(old_fd)
            for sig, h in old.items():
                signal.signal(sig, h)
            os.close(r)
            os.close(w)
        return got[0]

    # ---- stopping --------------------------------------------------------------------------------
    def _kill(self, c: Child) -> None:
        assert c.process is not None
        c.process.kill()  # the whole process group

    def close(self, grace: float = 5.0) -> None:
        """SIGTERM to every child (last started first), SIGKILL to those still up after ``grace`` seconds."""
        for c in self.children:
            if c.popen is not None and c.popen.poll() is None:
                c.state = "stopped"  # stopping: whatever exit follows is not a crash
        proc.stop_all([c.process for c in reversed(self.children) if c.process is not None], grace)
        for c in self.children:
            c.state = "stopped"
            if c.on_exit is not None:
                c.on_exit()
        self.write_state()
        self.children.clear()

    # ---- state -----------------------------------------------------------------------------------
    def write_state(self) -> None:
        upstate.write_state(self.workdir, {
            "pid": os.getpid(), "workdir": str(self.workdir.resolve()), "started": self.started,
            "updated": time.time(), "processes": [c.snapshot() for c in self.children] + self.external})
