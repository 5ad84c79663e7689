"""Child processes: spawn one (a ``kvrelay`` subcommand or any argv) with its output in a log file, wait until
it is ready (its ready file, a line it prints, or any condition, always with a deadline), stop it
(terminate, wait, kill; its whole process group when it has one), read its log, and check a pid's liveness.

Owns: every spawn of a kvrelay child process (supervisor, store daemon, router workers, vLLM servers,
benches, diagnostics, tests) and the liveness of a pid.  Must not touch: what the children do (the
ready file itself is kvrelay/readyfile.py's convention).  Base layer: the standard library only.

API
---
Spawning::

    from kvrelay import proc
    child = proc.spawn_kvrelay(["store", "--port", "0"], name="store", log=workdir / "store.log",
                               ready_file=workdir / "store.json", session=True, die_with_parent=True)
    info = child.wait_ready(timeout=120)   # the ready file's JSON
    ...
    child.stop()                           # SIGTERM, up to ``grace`` s, then SIGKILL

- ``spawn(argv, *, name, log, log_mode, log_header, env, cwd, session, die_with_parent, ready_file,
  pipes, tail_lines)`` -> `ChildProcess`.  ``log``: a path (stdout and stderr go there; with ``pipes``
  only stderr), `DISCARD`, `TO_STDOUT` (both to this process's stdout) or None (inherit this process's
  stdout and stderr).  ``log_mode`` "wb" or "ab"; ``log_header`` is written first; ``tail_lines``: how
  much of the log an error quotes (20).  ``env``/``cwd`` as for Popen (None: this process's).
  ``session``: its own session and process group (`stop`/`kill` then reach its grandchildren).
  ``die_with_parent``: it gets SIGTERM when the thread that started it dies.  ``ready_file``: removed
  before the spawn (an old one must not pass for this run's); `spawn_kvrelay` also passes it as
  ``--ready-file``.  ``pipes``: stdin and stdout are unbuffered pipes (a peer that prints a JSON line
  and serves until its stdin closes); otherwise stdin is /dev/null.
- ``spawn_kvrelay(args, **kw)``: ``python -m kvrelay.cli *args [--ready-file F]``; `kvrelay_argv(args)`.

`ChildProcess` (``.popen``, ``.argv``, ``.pid``, ``.name``, ``.log_path``, ``.ready_file``, ``.spawned``):

- ``poll()`` / ``alive()`` / ``returncode``; ``wait(timeout)``: its exit status, None if still running (a
  child that runs to completion: a pytest run, a check's part); ``ready()``: the ready file's JSON if
  written, else None (never blocks); ``signal(sig, group=False)``.
- ``wait_ready(timeout)`` -> the ready file's JSON; ``wait_until(cond, timeout, interval=, what=)`` -> the
  first truthy ``cond()``; ``read_json_line(timeout)`` -> the first stdout line that is a JSON object (with
  ``pipes``).  Each raises `ChildExited` (a `StartError` and a ChildProcessError) if the child exits
  first, `ChildTimeout` (a `StartError` and a TimeoutError) past the deadline, leaving it running: the
  caller decides.  `StartError` carries ``name``, ``code`` (exit status; None: still running),
  ``line`` (the log's last non-empty line: a kvrelay process that exits with code 2 printed its
  configuration error there) and ``tail``; its message names the log and quotes its tail.
- ``stop(grace=10, *, sig=SIGTERM, group=False, wait_group=False)`` -> exit status: ``sig`` to it (to its
  group with ``group``; ``sig=None``: close its stdin instead), wait up to ``grace`` s (``wait_group``: also
  for the rest of its group), then SIGKILL (to its group if it has one) and reap.  Idempotent.
  ``kill()``: SIGKILL (the group if any) and reap.  ``close_pipes()``.  Context manager: ``stop()`` and
  ``close_pipes()`` on exit.
- ``log_tail(n)``, ``last_log_line()``.

Several children: ``stop_all(children, grace=10)`` (SIGTERM to each, one shared deadline, then SIGKILL).
Without a child: ``wait_for(cond, timeout, interval=, what=)`` (TimeoutError), ``tail(path, n)``,
``last_line(path)``.  Liveness: ``pid_alive(pid, started=None)`` (a zombie is dead; with ``started``
from ``start_time(pid)``, a reused pid is dead too), ``group_alive(pgid)``; and ``rss_bytes(pid)``,
``cpu_seconds(pid)``; ``die_with_parent`` (the preexec hook behind the flag of the same name).

Polling: a child in another process offers nothing to block on but its file, its port or its pipe, so
waits poll their condition at a short interval under a deadline; none sleeps a fixed time.
"""

from __future__ import annotations

import json
import os
import select
import signal as _signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

T = TypeVar("T")
DISCARD = subprocess.DEVNULL  # ``log=DISCARD``: throw the child's output away
TO_STDOUT = subprocess.STDOUT  # ``log=TO_STDOUT``: its stdout and stderr both to this process's stdout
READY_POLL_S = 0.02  # a ready file is polled this often


# ---- errors --------------------------------------------------------------------------------------
class StartError(RuntimeError):
    """A child did not become ready.  ``code``: its exit status (None: still running); ``line``: the last
    non-empty line of its log ("" without one); ``tail``: the log's last lines."""

    def __init__(self, message: str, code: int | None = None, line: str = "", *, name: str = "",
                 tail: str = "") -> None:
        super().__init__(message)
        self.name, self.code, self.line, self.tail = name, code, line, tail


class ChildExited(StartError, ChildProcessError):
    """The child exited before it was ready."""


class ChildTimeout(StartError, TimeoutError):
    """The child was not ready within the deadline (it is left running)."""


# ---- logs ----------------------------------------------------------------------------------------
def tail(path: str | Path | None, n: int = 20) -> str:
    """The last ``n`` lines of the file at ``path``; "(no log)" if there is none."""
    if path is None:
        return "(no log)"
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def last_line(path: str | Path | None, n: int = 50) -> str:
    """The last non-empty line among the last ``n`` of the file at ``path`` ("" if none)."""
    lines = [ln for ln in tail(path, n).splitlines() if ln.strip()]
    return lines[-1] if lines and lines != ["(no log)"] else ""


# ---- liveness ------------------------------------------------------------------------------------
def start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, /proc/<pid>/stat field 22); None if it is gone
    or a zombie (it has exited: its memory is no one's)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):  # gone, or reaped while read (ESRCH)
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def pid_alive(pid: int, started: str | None = None) -> bool:
    """Whether process ``pid`` runs (a zombie does not) and, given ``started`` (`start_time` of the process
    meant), is that process, not another that reused its pid."""
    now = start_time(pid)
    return now is not None and (started is None or now == started)


def group_alive(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` is left (zombies included: they are not reaped yet)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` (VmRSS); OSError if it is gone."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS (a kernel thread or a zombie)")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process ``pid`` used so far; OSError if it is gone."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent (thread that started it) dies, so no child
    outlives its starter."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, _signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ---- waiting -------------------------------------------------------------------------------------
def wait_for(cond: Callable[[], T | None], timeout: float, *, interval: float = 0.05, what: str = "condition") -> T:
    """The first truthy ``cond()``, polled every ``interval`` s; TimeoutError naming ``what`` past ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout:.0f}s")
        time.sleep(interval)


def _read_json(path: Path) -> dict | None:
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None


# ---- a child -------------------------------------------------------------------------------------
class ChildProcess:
    """One spawned child (see the module docstring); made by `spawn` / `spawn_kvrelay`."""

    def __init__(self, popen: subprocess.Popen[bytes], *, name: str, log_path: Path | None, ready_file: Path | None,
                 session: bool, tail_lines: int = 20) -> None:
        self.popen = popen
        args = popen.args
        self.argv: list[str] = [str(a) for a in args] if isinstance(args, (list, tuple)) else [str(args)]
        self.name = name
        self.log_path = log_path
        self.ready_file = ready_file
        self.session = session
        self.tail_lines = tail_lines
        self.spawned = time.monotonic()

    # -- state
    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def poll(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the child exits (at most ``timeout`` s); its exit status, None if still running."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def ready(self) -> dict | None:
        """The ready file's JSON if the child wrote it, else None (never blocks)."""
        if self.ready_file is None:
            raise ValueError(f"{self.name} was spawned without a ready file")
        return _read_json(self.ready_file)

    def log_tail(self, n: int | None = None) -> str:
        return tail(self.log_path, self.tail_lines if n is None else n)

    def last_log_line(self) -> str:
        return last_line(self.log_path)

    # -- waiting
    def _error(self, cls: type[StartError], reason: str) -> StartError:
        where = f"; its log: {self.log_path}\n{self.log_tail()}" if self.log_path is not None else ""
        return cls(f"{self.name} {reason}{where}", self.popen.poll(), self.last_log_line(), name=self.name,
                   tail=self.log_tail() if self.log_path is not None else "")

    def wait_until(self, cond: Callable[[], T | None], timeout: float, *, interval: float = 0.05,
                   what: str = "ready") -> T:
        """The first truthy ``cond()``, checked every ``interval`` s while the child runs: ChildExited if it
        exits first, ChildTimeout past ``timeout`` s ("<name> was not <what> within ..s; its log ...")."""
        deadline = time.monotonic() + timeout
        while True:
            got = cond()
            if got:
                return got
            if self.popen.poll() is not None:
                raise self._error(ChildExited, f"exited with code {self.popen.returncode} before it was {what}")
            if time.monotonic() > deadline:
                raise self._error(ChildTimeout, f"was not {what} within {timeout:.0f}s")
            time.sleep(interval)

    def wait_ready(self, timeout: float) -> dict:
        """Wait until the child wrote its ready file; its JSON."""
        return self.wait_until(self.ready, timeout, interval=READY_POLL_S)

    def read_json_line(self, timeout: float) -> dict:
        """The first line the child prints on stdout that is a JSON object (other lines are skipped); needs
        ``pipes``.  ChildExited at end of output, ChildTimeout past ``timeout`` s."""
        out = self.popen.stdout
        if out is None:
            raise ValueError(f"{self.name} was spawned without pipes=True: nothing to read")
        deadline = time.monotonic() + timeout
        while True:
            if not select.select([out], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise self._error(ChildTimeout, f"was not ready within {timeout:.0f}s")
            line = out.readline()
            if not line:
                try:
                    self.popen.wait(max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
                raise self._error(ChildExited, f"exited with code {self.popen.poll()} before it was ready")
            if line.startswith(b"{"):
                return dict(json.loads(line))

    # -- stopping
    def signal(self, sig: int, group: bool = False) -> None:
        """Send ``sig`` to the child (to its process group with ``group``, which needs ``session``)."""
        if group:
            self._need_session("signal its group")
            _signal_group(self.popen.pid, sig)
        elif self.popen.poll() is None:
            self.popen.send_signal(sig)

    def kill(self) -> int:
        """SIGKILL (its whole group if it has one) and reap; its exit status."""
        if self.session:
            _signal_group(self.popen.pid, _signal.SIGKILL)
        elif self.popen.poll() is None:
            self.popen.kill()
        return self.popen.wait()

    def stop(self, grace: float = 10.0, *, sig: int | None = _signal.SIGTERM, group: bool = False,
             wait_group: bool = False) -> int:
        """``sig`` (None: close its stdin), wait up to ``grace`` s, then `kill`; its exit status."""
        if group or wait_group:
            self._need_session("stop its group")
        deadline = time.monotonic() + grace
        if self.popen.poll() is None or group:
            if sig is None:
                self._close_stdin()
            else:
                self.signal(sig, group)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        while wait_group and group_alive(self.popen.pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # its grandchildren exit after it: nothing to wait on but their pids
        if self.popen.poll() is None or (self.session and group_alive(self.popen.pid)):
            return self.kill()
        return self.popen.wait()

    def _close_stdin(self) -> None:
        if self.popen.stdin is not None and not self.popen.stdin.closed:
            try:
                self.popen.stdin.close()
            except OSError:  # the child is gone: its pipe is broken
                pass

    def _need_session(self, what: str) -> None:
        if not self.session:
            raise ValueError(f"{self.name} was spawned without session=True: cannot {what}")

    def close_pipes(self) -> None:
        for f in (self.popen.stdin, self.popen.stdout):
            if f is not None and not f.closed:
                try:
                    f.close()
                except OSError:
                    pass

    def __enter__(self) -> "ChildProcess":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        self.close_pipes()


def stop_all(children: Iterable[ChildProcess], grace: float = 10.0) -> None:
    """SIGTERM to every live child, then wait for all under one deadline of ``grace`` s; SIGKILL the rest."""
    live = [c for c in children if c.alive()]
    for c in live:
        c.signal(_signal.SIGTERM)
    deadline = time.monotonic() + grace
    for c in live:
        try:
            c.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            c.kill()


# ---- spawning ------------------------------------------------------------------------------------
def kvrelay_argv(args: Sequence[str]) -> list[str]:
    """The command line of ``kvrelay ARGS`` run by this interpreter."""
    return [sys.executable, "-m", "kvrelay.cli", *args]


def spawn(argv: Sequence[str], *, name: str | None = None, log: str | Path | int | None = None,
          log_mode: str = "wb", log_header: str = "", env: dict[str, str] | None = None,
          cwd: str | Path | None = None, session: bool = False, die_with_parent: bool = False,
          ready_file: str | Path | None = None, pipes: bool = False, tail_lines: int = 20) -> ChildProcess:
    """Start ``argv`` as a child process (see the module docstring); it is not waited for."""
    if log_mode not in ("wb", "ab"):
        raise ValueError(f"log_mode {log_mode!r}: 'wb' (a fresh log) or 'ab' (append)")
    ready = Path(ready_file) if ready_file is not None else None
    if ready is not None:
        ready.unlink(missing_ok=True)
    if log not in (None, DISCARD, TO_STDOUT) and not isinstance(log, (str, Path)):
        raise ValueError(f"log {log!r}: a path, proc.DISCARD, proc.TO_STDOUT or None (inherit)")
    if pipes and log == TO_STDOUT:
        raise ValueError("log=TO_STDOUT with pipes=True would send its stderr into the pipe read for its address")
    out: IO[bytes] | None = None
    log_path: Path | None = None
    sink: IO[bytes] | int | None = DISCARD if log == DISCARD else None
    if isinstance(log, (str, Path)):
        log_path = Path(log)
        out = open(log_path, log_mode)
        sink = out
    try:
        if out is not None and log_header:
            out.write(log_header.encode())
            out.flush()
        if pipes:
            popen = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=sink,
                                     bufsize=0, env=env, cwd=cwd, start_new_session=session,
                                     preexec_fn=_signal_parent_death if die_with_parent else None)
        else:
            popen = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=sink,
                                     stderr=subprocess.STDOUT if sink is not None or log == TO_STDOUT else None,
                                     env=env, cwd=cwd,
                                     start_new_session=session,
                                     preexec_fn=_signal_parent_death if die_with_parent else None)
    finally:
        if out is not None:
            out.close()  # the child holds its own descriptor
    return ChildProcess(popen, name=name or Path(argv[0]).name, log_path=log_path, ready_file=ready,
                        session=session, tail_lines=tail_lines)


_signal_parent_death = die_with_parent  # the preexec hook (the name `spawn`'s flag shadows)


def spawn_kvrelay(args: Sequence[str], *, name: str | None = None, ready_file: str | Path | None = None,
                  **kw: Any) -> ChildProcess:
    """``kvrelay ARGS`` (this interpreter, ``-m kvrelay.cli``), with ``--ready-file`` when ``ready_file`` is
    given; ``kw`` as for `spawn`."""
    argv = kvrelay_argv(args) + (["--ready-file", str(ready_file)] if ready_file is not None else [])
    return spawn(argv, name=name or f"kvrelay {args[0] if args else ''}".strip(), ready_file=ready_file, **kw)
