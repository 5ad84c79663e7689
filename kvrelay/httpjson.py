"""Small HTTP-JSON helpers for clients of kvrelay's and vLLM's HTTP servers (launcher, demo, benches, tests).

Owns: `http_json` (GET or POST JSON, the parsed answer, a RuntimeError naming the URL and quoting the body
on an HTTP error), `get_text` (GET, the body as text) and `free_port` (a loopback port for a server about
to start).  Must not touch: any server (they live in their own packages).  Base layer: standard library only.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_json(url: str, body: dict | None = None, timeout: float = 300.0,
              headers: dict[str, str] | None = None) -> Any:
    """GET (``body`` None) or POST JSON, with ``headers`` added; the parsed answer.  RuntimeError naming the
    URL (and quoting the first 500 characters of the answer) on HTTP errors."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{url} answered HTTP {exc.code}: {exc.read().decode(errors='replace')[:500]}") from None


def get_text(url: str, timeout: float = 10.0) -> str:
    """GET ``url``; its body as text (urllib's errors pass through)."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return str(r.read().decode())
