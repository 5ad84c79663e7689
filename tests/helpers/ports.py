"""Free loopback ports for tests that write cluster files (fixed ports, as `kvrelay up -f` wants them)."""

from __future__ import annotations

import socket


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now (all bound at once, so no two are the same)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_pairs(n: int, avoid: list[int]) -> list[int]:
    """``n`` ports P whose P + 1 is free too (a store's events_port and its replay socket), none in ``avoid``."""
    found: list[int] = []
    while len(found) < n:
        port = free_ports(1)[0]
        taken = {*avoid, *found, *(f + 1 for f in found)}
        if port >= 65535 or port in taken or port + 1 in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        found.append(port)
    return found
