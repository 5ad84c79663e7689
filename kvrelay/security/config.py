"""Which keys this process uses: ``--keys DIR`` on every command, ``KVRELAY_KEYS`` as the fallback.

`configure` is called once by a command's ``main`` before anything binds; it also sets ``KVRELAY_KEYS``
so that child processes (vLLM's engine core, a supervisor's children) use the same keys.  `current`
answers for code deep inside (store clients, transports) that is not handed the keys explicitly.

Owns: the process-wide choice of keys, and the loopback-unless-authenticated rule (`check_loopback`).  Must not touch: the files (keyfiles.py) or sockets (curve.py).
"""

from __future__ import annotations

import argparse
import os
import threading
from contextlib import contextmanager
from typing import Iterator

from kvrelay.security.keyfiles import Keys, load

ENV = "KVRELAY_KEYS"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
_lock = threading.Lock()
_current: Keys | None = None
_loaded_from: str | None = None  # the $KVRELAY_KEYS value _current was lazily loaded from
_UNSET = object()
_override: object = _UNSET  # set by `using` (tests, benchmarks): wins over everything else


def add_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keys", metavar="DIR", default=None,
                   help=f"key directory written by `kvrelay keys DIR`: authenticate every plane (default: ${ENV}); "
                        f"needed to bind anything but loopback")


def configure(directory: str | None) -> Keys | None:
    """Use the keys in ``directory`` (None or "": those in $KVRELAY_KEYS, if set) for this process and its
    children; KeysError names a bad directory."""
    global _current, _loaded_from
    directory = directory or os.environ.get(ENV) or None
    with _lock:
        if directory is None:
            _current, _loaded_from = None, None
            return None
        keys = load(directory)
        os.environ[ENV] = str(keys.directory)
        _current, _loaded_from = keys, str(keys.directory)
        return keys


def current() -> Keys | None:
    """This process's keys: the configured ones, else those of $KVRELAY_KEYS (loaded once), else None."""
    global _current, _loaded_from
    if _override is not _UNSET:
        return _override  # type: ignore[return-value]
    env = os.environ.get(ENV) or None
    with _lock:
        if _current is not None and (env is None or env == _loaded_from):
            return _current
        if env is None:
            return None
        _current, _loaded_from = load(env), env
        return _current


@contextmanager
def using(keys: Keys | None) -> Iterator[None]:
    """Within the block, `current()` is ``keys`` (None: no authentication), whatever was configured: for tests
    and benchmarks that build servers and clients with different keys in one process.  Components read
    `current()` when they are constructed and keep what they got."""
    global _override
    old, _override = _override, keys
    try:
        yield
    finally:
        _override = old


def check_loopback(host: str, what: str, keys: Keys | None = None) -> None:
    """ValueError unless ``host`` is loopback or authentication is on (``keys``, else this process's keys)."""
    if host in LOOPBACK or (keys or current()) is not None:
        return
    raise ValueError(f"--host {host!r}: the {what} binds a non-loopback address only with authentication on: "
                     f"write a key directory once with `kvrelay keys DIR`, copy it to every host, then pass "
                     f"--keys DIR (or set {ENV}=DIR) to every kvrelay process")
