"""The client side imports nothing of the daemon: an engine that loads the store client must not load the
store's core, server, background threads, SSD tier or index (and everything they import)."""

from __future__ import annotations

import json
import subprocess
import sys

DAEMON_MODULES = {f"kvrelay.store.{m}" for m in
                  ("core", "server", "daemon", "spill", "promote", "ssd", "ssd_format", "upkeep", "index",
                   "metrics")}


def test_client_loads_no_daemon_module():
    code = ("import json, sys, kvrelay.store.client; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('kvrelay'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert "kvrelay.store.client" in loaded and "kvrelay.keys" in loaded
    assert not loaded & DAEMON_MODULES, f"loading the store client loads the daemon's {sorted(loaded & DAEMON_MODULES)}"
