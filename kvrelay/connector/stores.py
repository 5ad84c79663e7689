"""The stores a decode pulls from: its own host's store and, with a store on every host, the other hosts'.

A decode pulls each chunk from the store that holds it: the one its request's ``kv_transfer_params`` name
(``store_address``: the prefill's own store).  `StoreClients` answers which client to pull through: the
engine's own client (shm on its host) for its own store's address; for another host's store, a client
over ``remote_transport`` (tcp or nixl), made on first use and kept in a small LRU of at most ``limit``
(the least recently used one not in use is closed beyond it).  Only the addresses in ``peers`` (the
cluster's other stores) are reached: a store a params names and nobody configured is refused
(`TransferError` MISMATCH naming it), so even a signed params cannot send a decode to a store of its choice.
Each other store has its own breaker: after it failed, pulls from it fail at once (UNAVAILABLE: the
engine recomputes) until its cooldown lets the next one through as the probe; no store's failure reaches
another's pulls.

Owns: `StoreClients` and `PullClient` (the part of a store client a puller uses).  Must not touch: pulling itself (puller.py) or the store protocol.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

from kvrelay.connector.breaker import CircuitBreaker
from kvrelay.connector.state import FailureCode, TransferError
from kvrelay.keys import ChunkKey
from kvrelay.transfer.wire import ChunkHeader

log = logging.getLogger("kvrelay.connector.stores")
DEFAULT_LIMIT = 8  # open clients to other hosts' stores


class PullClient(Protocol):
    """The part of `kvrelay.store.client.StoreClient` a puller uses."""

    transport: str

    def pull(self, key: ChunkKey, out: torch.Tensor, deadline: float, verify_checksum: bool = ...,
             request_id: str = ...) -> ChunkHeader: ...
    def pull_many(self, keys: Sequence[ChunkKey], outs: Sequence[torch.Tensor], deadline: float,
                  verify_checksum: bool = ..., request_id: str = ...) -> list[ChunkHeader]: ...
    def abort(self, request_id: str, reason: str) -> int: ...
    def ping(self) -> None: ...
    def close(self) -> None: ...


@dataclass(slots=True)
class _Peer:
    breaker: CircuitBreaker
    client: PullClient | None = None
    users: int = 0
    pulls: int = field(default=0)  # pulls that went through it (tests and metrics read it)


class StoreClients:
    def __init__(self, own: PullClient, own_address: str, *, peers: Iterable[str] = (),
                 make: Callable[[str], PullClient] | None = None, limit: int = DEFAULT_LIMIT,
                 cooldown_s: float = 1.0) -> None:
        """``own``: the client of this engine's store at ``own_address``; ``peers``: the other stores it may
        pull from, each reached through ``make(address)``; ``limit``: most clients to them kept open."""
        if limit < 1:
            raise ValueError(f"limit {limit}: keep at least 1 client to another store open")
        self.own, self.own_address = own, own_address
        self.peers = frozenset(peers) - {own_address}
        if self.peers and make is None:
            raise ValueError("peers need make(address), the factory of their clients")
        self._make, self.limit, self.cooldown_s = make, limit, cooldown_s
        self._lock = threading.Lock()
        self._peers: dict[str, _Peer] = {}  # every peer met: its breaker (and its client while it is open)
        self._open: OrderedDict[str, None] = OrderedDict()  # peers with an open client, least recent first
        self.made = 0  # clients made (a test counts them)

    def check(self, address: str) -> None:
        """TransferError MISMATCH unless ``address`` is this engine's store or one of its peers."""
        if address == self.own_address or address in self.peers:
            return
        known = ", ".join(sorted(self.peers)) or "none"
        raise TransferError(FailureCode.MISMATCH,
                            f"kv_transfer_params name store {address}, which is not one of this decode's stores "
                            f"(its own {self.own_address}; other hosts' {known}): give the engine --peer-store "
                            f"{address} if that store belongs to the cluster")

    @contextmanager
    def using(self, address: str) -> Iterator[PullClient]:
        """The client of ``address`` for a pull (kept open while the pull runs); TransferError MISMATCH for an
        unknown store, UNAVAILABLE while its breaker is open or when it cannot be reached."""
        self.check(address)
        if address == self.own_address:
            yield self.own
            return
        peer, client = self._acquire(address)
        failed = False
        try:
            yield client
        except Exception as exc:
            failed = FailureCode.of(exc) is FailureCode.UNAVAILABLE
            if failed:
                peer.breaker.failure(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            with self._lock:
                peer.users -= 1
                peer.pulls += 1
            if not failed:
                peer.breaker.success()
            self._trim()

    def lookup(self, address: str) -> PullClient | None:
        """The open client of ``address`` (this engine's own for its store), or None: nothing is made."""
        if address == self.own_address:
            return self.own
        with self._lock:
            peer = self._peers.get(address)
            return peer.client if peer is not None else None

    def breaker(self, address: str) -> CircuitBreaker | None:
        """The breaker of another host's store, once it was met."""
        with self._lock:
            peer = self._peers.get(address)
        return peer.breaker if peer is not None else None

    def pulls(self, address: str) -> int:
        with self._lock:
            peer = self._peers.get(address)
        return peer.pulls if peer is not None else 0

    def open_addresses(self) -> list[str]:
        with self._lock:
            return list(self._open)

    def _acquire(self, address: str) -> tuple[_Peer, PullClient]:
        with self._lock:
            peer = self._peers.get(address)
            if peer is None:
                peer = self._peers[address] = _Peer(CircuitBreaker(f"kvrelay store {address} (peer)", self.cooldown_s))
        if not peer.breaker.allow():
            raise TransferError(FailureCode.UNAVAILABLE, f"store {address} is skipped after a failure "
                                                         f"({peer.breaker.last_error})")
        with self._lock:
            client = peer.client
            if client is not None:
                peer.users += 1
                self._open.move_to_end(address)
                return peer, client
        assert self._make is not None  # check() let only peers through, and peers need make
        try:
            client = self._make(address)  # outside the lock: a handshake with a far store takes a round trip
        except Exception as exc:
            peer.breaker.failure(f"{type(exc).__name__}: {exc}")
            raise TransferError(FailureCode.UNAVAILABLE, f"cannot reach store {address}: {exc}") from exc
        with self._lock:
            if peer.client is None:
                peer.client = client
                self.made += 1
            else:  # another thread made one meanwhile: keep its
                client, extra = peer.client, client
                extra.close()
            peer.users += 1
            self._open[address] = None
            self._open.move_to_end(address)
        return peer, client

    def _trim(self) -> None:
        """Close the least recently used clients not in use beyond ``limit``."""
        closing = []
        with self._lock:
            for address in list(self._open):
                if len(self._open) <= self.limit:
                    break
                peer = self._peers[address]
                if peer.users == 0 and peer.client is not None:
                    closing.append(peer.client)
                    peer.client = None
                    del self._open[address]
        for client in closing:
            try:
                client.close()
            except Exception as exc:  # noqa: BLE001 - a dead store's client: nothing left to hand back
                log.debug("closing an evicted store client failed: %s", exc)

    def close(self) -> None:
        with self._lock:
            clients = [p.client for p in self._peers.values() if p.client is not None]
            for p in self._peers.values():
                p.client = None
                p.breaker.close()
            self._open.clear()
        for client in clients:
            try:
                client.close()
            except Exception as exc:  # noqa: BLE001
                log.debug("closing a store client failed: %s", exc)
        self.own.close()
