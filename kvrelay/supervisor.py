"""Supervision of `kvrelay up`'s kvrelay processes (store, engines, router): start them, wait until they
are ready, and restart one that dies, with backoff.

Owns: spawning (the ready-file convention; each child in its own session, sent SIGTERM if `kvrelay up`
dies), the restart policy (`Backoff`), the loop that notices exits (woken by SIGCHLD, SIGINT, SIGTERM),
stopping everything, and the state file `kvrelay status` reads (written through upstate.py on every
change).  A restarted process gets the ports its first run picked, so its peers reconnect by themselves.
A process that exits because `kvrelay up` is stopping is not restarted.  Must not touch: what the
processes do, or which processes run with which flags (launcher.py).
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kvrelay import upstate
from kvrelay.readyfile import wait_ready_file
from kvrelay.store.process import die_with_parent

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


class StartError(RuntimeError):
    """A child did not become ready; ``code`` is its exit code (None: still running), ``line`` the last line
    of its log (a kvrelay process that exits with code 2 printed its configuration error there)."""

    def __init__(self, message: str, code: int | None, line: str) -> None:
        super().__init__(message)
        self.code, self.line = code, line


@dataclass(eq=False)
class Child:
    name: str
    args: list[str]  # the `kvrelay` subcommand and its flags; ports pinned once the first run picked them
    workdir: Path
    backoff: Backoff
    on_exit: Callable[[], None] | None = None  # after each exit (e.g. remove what a killed store left behind)
    timeout: float = 120.0  # to become ready, at each start
    popen: subprocess.Popen | None = None
    info: dict = field(default_factory=dict)  # its ready file
    state: str = "starting"  # starting, running, waiting (to be restarted), failed (given up), stopped
    restarts: int = 0
    started: float = 0.0  # wall clock of the last spawn
    spawned: float = 0.0  # monotonic, of the last spawn
    ready_at: float = 0.0  # monotonic, when it last became ready
    last_exit: int | None = None
    restart_at: float = 0.0

    @property
    def ready_file(self) -> Path:
        return self.workdir / f"{self.name}.ready.json"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def snapshot(self) -> dict[str, Any]:
        info = self.info
        address = info.get("address") or info.get("url", "")
        if "address" in info:
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


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


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

    def wait_ready(self, child: Child) -> dict:
        """Wait for a child `spawn` started; StartError (with its exit code and log tail) if it fails."""
        assert child.popen is not None
        try:
            info = wait_ready_file(child.ready_file, child.popen, child.timeout)
        except (ChildProcessError, TimeoutError) as exc:
            lines = [ln for ln in _tail(child.log_path, 50).splitlines() if ln.strip()]
            raise StartError(f"{child.name} {exc}; its log: {child.log_path}\n{_tail(child.log_path)}",
                             child.popen.poll(), lines[-1] if lines else "") from None
        self._ready(child, info)
        return info

    def start(self, name: str, args: list[str], *, on_exit: Callable[[], None] | None = None,
              timeout: float = 120.0) -> dict:
        return self.wait_ready(self.spawn(name, args, on_exit=on_exit, timeout=timeout))

    def _spawn(self, child: Child) -> None:
        child.ready_file.unlink(missing_ok=True)  # an earlier run's ready file must not pass for this one's
        argv = [sys.executable, "-m", "kvrelay.cli", *child.args, "--ready-file", str(child.ready_file)]
        out = None
        if not self.verbose:
            out = open(child.log_path, "ab" if child.restarts else "wb")  # a restart keeps the crash's log
            if child.restarts:
                out.write(f"\n--- kvrelay up: restart {child.restarts} of {child.name} at "
                          f"{time.strftime('%H:%M:%S')} ---\n".encode())
                out.flush()
        try:
            child.popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           start_new_session=True, preexec_fn=die_with_parent)
        finally:
            if out is not None:
                out.close()
        child.state, child.started, child.spawned = "starting", time.time(), time.monotonic()
        self.write_state()

    def _ready(self, child: Child, info: dict) -> None:
        child.info, child.state, child.ready_at = info, "running", time.monotonic()
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
                if c.ready_file.exists():
                    self._ready(c, json.loads(c.ready_file.read_text()))
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
        assert c.popen is not None
        try:
            os.killpg(c.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        c.popen.wait()

    def close(self, grace: float = 5.0) -> None:
        """SIGTERM to every child (last started first), SIGKILL to those still up after ``grace`` seconds."""
        live = [c for c in reversed(self.children) if c.popen is not None and c.popen.poll() is None]
        for c in live:
            c.state = "stopped"  # stopping: whatever exit follows is not a crash
            assert c.popen is not None
            c.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for c in live:
            assert c.popen is not None
            try:
                c.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._kill(c)
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
