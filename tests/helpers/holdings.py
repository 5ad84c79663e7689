"""What a store holds for requests, as the abort tests (issue 26) compare it before and after an abort.

Importable in every test as ``from holdings import store_held`` (pyproject's pytest ``pythonpath``)."""

from __future__ import annotations


def store_held(store, transport: str = "shm") -> tuple[int, int]:
    """The (pins, reserved bytes) of ``store`` (a daemon: anything with an ``address``) now, read through a
    short-lived stats-only client."""
    from kvrelay.store.client import StoreClient
    with StoreClient(store.address, transport=transport, compat_hash="stats-only", name="abort-stats") as c:
        s = c.stats()
    return s["pins"], s["reserved_bytes"]
