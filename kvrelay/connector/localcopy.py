"""A copy, in a decode's own host store, of the chunks it pulled from another host's store (a store on every
host, issue 23): with ``keep_copies`` on, the next request on this host for the same prefix reads them over
shm instead of crossing the network again.  The copy is reserved with the prompt's token ids, so the own
store announces it in its KV events like any published chunk (and the router can hint at it).

What it costs: one reservation round trip per request, a copy (with checksum) of every pulled chunk into the
own store's pool, and one commit round trip per layer; the pull never fails because of it (a full store or
any error stops only the copy, logged).  Whether it pays is measured by tests/engine/test_prefix_hint.py's
benchmark (README: "Many hosts"); it is off by default.

Owns: `LocalCopy` (one request's copy).  Must not touch: the pull itself (puller.py), the store protocol.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import torch

from kvrelay.keys import ChunkKey
from kvrelay.transfer.wire import ChunkHeader

log = logging.getLogger("kvrelay.connector.copy")


class CopyClient(Protocol):
    """The part of `kvrelay.store.client.StoreClient` a copy uses."""

    def lookup(self, keys: list[ChunkKey], tenant: str = ...) -> int: ...
    def reserve(self, request_id: str, chunks: list[tuple[ChunkKey, int]], ttl: float = ..., tenant: str = ...,
                tokens: Sequence[int] = ...) -> None: ...
    def publish(self, key: ChunkKey, header: ChunkHeader, payload, *, wait: bool = ...) -> None: ...
    def flush(self) -> None: ...
    def release(self, request_id_or_keys: str | Sequence[ChunkKey]) -> None: ...


def held(client: CopyClient, keys: Sequence[ChunkKey], tenant: str = "") -> bool:
    """Whether ``client``'s store holds every one of ``keys`` ready (one round trip), asked as ``tenant`` (the
    request's cache_salt); False if it cannot say."""
    try:
        n = client.lookup(list(keys), tenant=tenant) if tenant else client.lookup(list(keys))
        return bool(keys) and n == len(keys)
    except Exception as exc:  # noqa: BLE001 - the own store does not answer: pull from the named one
        log.debug("own store lookup failed: %s", exc)
        return False


class LocalCopy:
    def __init__(self, client: CopyClient, request_id: str, chunks: Sequence[tuple[ChunkKey, int]],
                 tokens: Sequence[int], tenant: str = "", ttl: float = 60.0) -> None:
        """Reserve ``chunks`` (key, bytes) in the own store under ``tokens`` (the prompt's ids, for its events);
        a refused reservation leaves the copy off."""
        self.client, self.request_id = client, f"copy:{request_id}"
        self.active = True
        self.copied = 0  # bytes copied
        try:
            client.reserve(self.request_id, list(chunks), ttl=ttl, tenant=tenant, tokens=tokens)
        except Exception as exc:  # noqa: BLE001 - full, over quota, gone: no copy, the pull goes on
            log.info("no local copy of %s: %s", request_id, exc)
            self.active = False

    def put(self, key: ChunkKey, header: ChunkHeader, payload: torch.Tensor) -> None:
        """Copy one pulled chunk (its verified header and bytes) into the own store; committed at `layer_done`."""
        if not self.active:
            return
        try:
            self.client.publish(key, header, payload, wait=False)
            self.copied += header.nbytes
        except Exception as exc:  # noqa: BLE001
            self._stop(exc)

    def layer_done(self) -> None:
        if self.active:
            try:
                self.client.flush()
            except Exception as exc:  # noqa: BLE001
                self._stop(exc)

    def close(self, complete: bool) -> None:
        """The pull ended: what was reserved and not committed goes back (an incomplete copy is dropped)."""
        if not complete or not self.active:
            self.active = False
            try:
                self.client.release(self.request_id)
            except Exception as exc:  # noqa: BLE001 - the reservation's ttl ends it
                log.debug("release of %s failed: %s", self.request_id, exc)

    def _stop(self, exc: Exception) -> None:
        log.warning("local copy of %s stopped: %s", self.request_id, exc)
        self.active = False
