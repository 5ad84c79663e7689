"""Refused peers: one process-wide counter, ``kvrelay_auth_refused_total{plane, reason}``, and its log line.

Every plane (store, transport handshakes, the tcp data plane, events, HTTP) reports a refusal through
`refused`; each process's /metrics page includes the counter by `register`-ing it in its own registry.

Owns: the counter and the rate-limited warning.  Must not touch: the decision to refuse.
"""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger("kvrelay.security")

REGISTRY = CollectorRegistry()
REFUSED = Counter("kvrelay_auth_refused", "Peers or requests refused for want of the right key or token, by plane "
                  "and reason", ["plane", "reason"], registry=REGISTRY)
LOG_EVERY_S = 10.0  # after the first refusal of a (plane, reason), one summary line at most this often
_last: dict[tuple[str, str], tuple[float, int]] = {}
_lock = threading.Lock()


def register(registry: CollectorRegistry) -> None:
    """Show the refusal counter on ``registry``'s /metrics page too (idempotent)."""
    try:
        registry.register(REFUSED)
    except ValueError:  # already there
        pass


def refused(plane: str, reason: str, peer: str = "") -> None:
    """Count one refused peer and log it (the first of each kind at once, then a summary every 10 s)."""
    REFUSED.labels(plane, reason).inc()
    now = time.monotonic()
    with _lock:
        last, quiet = _last.get((plane, reason), (-LOG_EVERY_S, 0))
        if now - last < LOG_EVERY_S:
            _last[(plane, reason)] = (last, quiet + 1)
            return
        _last[(plane, reason)] = (now, 0)
    more = f" (and {quiet} more since the last line)" if quiet else ""
    log.warning("refused a peer on the %s plane%s: %s%s; give it the cluster's key directory "
                "(`--keys DIR`, written by `kvrelay keys DIR`)", plane, f" from {peer}" if peer else "", reason, more)


def count(plane: str, reason: str) -> float:
    """The counter's value (tests, benchmarks)."""
    return REFUSED.labels(plane, reason)._value.get()


def total(plane: str) -> float:
    """All refusals on ``plane`` so far, whatever the reason."""
    value = 0.0
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels.get("plane") == plane:
                value += sample.value
    return value
