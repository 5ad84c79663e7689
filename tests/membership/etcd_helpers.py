"""A real etcd process for the membership tests: 127.0.0.1, free client and peer ports, its own data dir.

`require_etcd()` skips a test when no etcd binary is installed (Debian's ``etcd-server``; the README's
test command installs it through scripts/install-etcd.sh), and fails it when CI is set: CI must run these.
`EtcdProcess` starts etcd, waits until its /health answers, and can kill (SIGKILL) and restart it on the
same ports, with the same data dir or a fresh one.  With ``keys`` (a key directory holding etcd certificates: `kvrelay keys DIR
--etcd-host HOST`) it serves https:// with client-certificate auth on ``host``; ``wrap`` turns its argv into
the command that runs it (e.g. inside a network namespace: netns.Hosts.command); its peer port stays on
loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import urllib.request
from pathlib import Path
from typing import Callable

import pytest

from kvrelay import proc
from kvrelay.httpjson import free_port
from kvrelay.membership import EtcdTLS, server_flags
from waiting import wait_until


def etcd_binary() -> str | None:
    return shutil.which("etcd") or (str(Path("/usr/bin/etcd")) if Path("/usr/bin/etcd").exists() else None)


def require_etcd() -> str:
    """The etcd binary; without one, skip (CI set: fail)."""
    binary = etcd_binary()
    if binary is not None:
        return binary
    why = "etcd is not installed (apt-get install -y etcd-server, or scripts/install-etcd.sh)"
    if os.environ.get("CI"):
        pytest.fail(f"{why}; CI must run the membership tests", pytrace=False)
    pytest.skip(why)


class EtcdProcess:
    def __init__(self, workdir: Path, keys: Path | None = None, host: str = "127.0.0.1",
                 wrap: Callable[[list[str]], list[str]] = list) -> None:
        self.binary = require_etcd()
        self.workdir, self.keys, self.host, self.wrap = workdir, keys, host, wrap
        self.client_port, self.peer_port = free_port(), free_port()
        self.url = f"{'https' if keys else 'http'}://{host}:{self.client_port}"
        self.ssl: ssl.SSLContext | None = EtcdTLS.from_keys_dir(keys).ssl_context() if keys else None
        self.child: proc.ChildProcess | None = None
        self.starts = 0

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1, context=self.ssl) as r:
                return r.status == 200 and json.loads(r.read()).get("health") == "true"
        except (OSError, ValueError):
            return False

    def start(self, fresh: bool = False) -> EtcdProcess:
        data = self.workdir / "etcd-data"
        if fresh:
            shutil.rmtree(data, ignore_errors=True)
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.starts += 1
        tls = server_flags(self.keys) if self.keys else []
        self.child = proc.spawn(self.wrap([self.binary, "--name", "kvrelay-test", "--data-dir", str(data),
                                           "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                                           "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                                           "--initial-cluster", f"kvrelay-test={peer}", "--log-level", "warn",
                                           *tls]),
                                name="etcd", log=self.workdir / f"etcd{self.starts}.log", die_with_parent=True)
        wait_until(lambda: self.healthy() or (self.child is not None and self.child.poll() is not None), 30,
                   "etcd answering /health")
        if not self.healthy():
            raise RuntimeError(f"etcd exited at start:\n{self.child.log_tail()}")
        return self

    def kill(self) -> None:
        if self.child is not None:
            self.child.kill()
            self.child = None
