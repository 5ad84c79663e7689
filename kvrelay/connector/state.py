"""Typed per-request transfer state: what a publisher or a puller knows about one request, and why it
failed.

Owns: `FailureCode` (the closed set of reasons a transfer fails; the same strings label the metrics),
`TransferFailure`, `PublishState` / `PullState` and their phase enums.  The publisher thread and the
puller threads write these; an engine reads them (phases are plain attribute writes, safe under the GIL,
and every transition is followed by the owner's callback).  Must not touch: engines, stores, transports
(from the store it reads only its error codes, `kvrelay.store.errors.StoreCode`, to map them).
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field

from kvrelay.keys import ChunkKey
from kvrelay.params import KVTransferParams
from kvrelay.store.errors import StoreCode


class FailureCode(str, enum.Enum):
    """Why a transfer failed.  The value is the metric label and the first word of the message."""

    TIMEOUT = "timeout"  # a deadline passed (pull deadline, store round trip)
    ABORTED = "aborted"  # the request was aborted here, or its prefill gave up (the store said so)
    STORE_FULL = "full"  # the store refused a reservation even after eviction
    QUOTA = "quota"  # the store refused a reservation: the tenant is over its quota even after its own evictions
    UNAVAILABLE = "unavailable"  # the store or a peer could not be reached, or the client is closed
    CORRUPT = "corrupt"  # a chunk failed its checksum
    MISMATCH = "mismatch"  # params or a chunk header disagree with this engine (model, layers, tokens)
    REFUSED = "refused"  # the store refused the request for another reason (bad request, not found)
    INTERNAL = "internal"  # anything else: a bug, logged with its traceback

    @classmethod
    def of(cls, exc: BaseException) -> "FailureCode":
        """The code for an exception raised by the store client, a transport or this package."""
        if isinstance(exc, TransferError):
            return exc.code
        if isinstance(exc, TimeoutError):
            return cls.TIMEOUT
        code = getattr(exc, "code", None)  # a kvrelay.store.errors.StoreError's `StoreCode`
        if isinstance(code, str):
            return _STORE_CODES.get(code, cls.REFUSED)  # a code this side does not know: a newer store's refusal
        if isinstance(exc, (ConnectionError, OSError)):
            return cls.UNAVAILABLE
        from kvrelay.transfer.base import HandshakeError, TransferError as TransportError
        if isinstance(exc, HandshakeError):
            return cls.MISMATCH
        if isinstance(exc, TransportError):  # the data path to the store failed (its peer exited, a lost link)
            return cls.UNAVAILABLE
        return cls.INTERNAL


# Every store code's failure (a test checks that none is missing: a code left out was counted as REFUSED).
_STORE_CODES: dict[str, FailureCode] = {
    StoreCode.TIMEOUT: FailureCode.TIMEOUT, StoreCode.ABORTED: FailureCode.ABORTED,
    StoreCode.FULL: FailureCode.STORE_FULL, StoreCode.QUOTA: FailureCode.QUOTA, StoreCode.CORRUPT: FailureCode.CORRUPT,
    StoreCode.CLOSED: FailureCode.UNAVAILABLE, StoreCode.UNREACHABLE: FailureCode.UNAVAILABLE,
    StoreCode.SESSION: FailureCode.UNAVAILABLE, StoreCode.NOT_FOUND: FailureCode.REFUSED,
    StoreCode.BAD_REQUEST: FailureCode.REFUSED, StoreCode.VERSION: FailureCode.MISMATCH,
    StoreCode.INTERNAL: FailureCode.INTERNAL, StoreCode.MISMATCH: FailureCode.MISMATCH,
}


class TransferError(Exception):
    """Raised inside this package with a code of its own (a header mismatch, an abort)."""

    def __init__(self, code: FailureCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class TransferFailure:
    code: FailureCode
    message: str

    @classmethod
    def from_exception(cls, exc: BaseException, context: str = "") -> "TransferFailure":
        msg = str(exc) or type(exc).__name__
        return cls(FailureCode.of(exc), f"{context}: {msg}" if context else msg)

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"


@dataclass(frozen=True, slots=True)
class ChunkJob:
    """One (layer, chunk) a publisher packs: tokens [token_start, token_end) of the request."""

    layer: int
    key: ChunkKey
    token_start: int
    token_end: int


class PublishPhase(enum.Enum):
    REFUSED = "refused"  # the store refused the reservation: nothing is published, the blocks are free
    PUBLISHING = "publishing"  # reserved; the publisher thread reads the request's blocks layer by layer
    COMMITTED = "committed"  # every layer and the first token are committed
    FAILED = "failed"  # gave up after reserving (``failure`` says why); the publisher reads no more blocks


@dataclass(eq=False)
class PublishState:
    """One request being published.  ``block_ids`` are read by the publisher thread while the phase is
    PUBLISHING: the engine frees them only after that (the publisher's ``done`` callback)."""

    request_id: str
    block_ids: list[int]
    params: KVTransferParams
    chunks: list[ChunkJob]
    meta_key: ChunkKey  # where the first token goes (kvrelay.connector.addressing.first_token_key)
    phase: PublishPhase = PublishPhase.PUBLISHING
    failure: TransferFailure | None = None
    committed_bytes: int = 0
    abort_reason: str | None = None  # set by `LayerPublisher.abort` (any thread): publish no further layer

    @property
    def holds_blocks(self) -> bool:
        """True while the publisher may still read this request's blocks."""
        return self.phase is PublishPhase.PUBLISHING

    def fail(self, failure: TransferFailure) -> None:
        if self.failure is None:
            self.failure = failure
        if self.phase is PublishPhase.PUBLISHING:
            self.phase = PublishPhase.FAILED


class PullPhase(enum.Enum):
    QUEUED = "queued"  # handed to the puller, no worker yet
    PULLING = "pulling"  # a worker pulls and unpacks layer by layer (``layers_done`` so far)
    DONE = "done"  # every layer is unpacked into the blocks (and the first token is known)
    FAILED = "failed"  # ``failure`` says why; the blocks hold garbage and must be recomputed or freed


@dataclass(eq=False)
class PullState:
    """One request whose prompt KV is pulled into ``block_ids``.  Tokens below ``skip_tokens`` are
    already in this engine's cache (its own prefix cache) and are not written.  The engine reuses the
    blocks only after the puller's ``done`` callback (DONE or FAILED)."""

    params: KVTransferParams
    block_ids: list[int]
    skip_tokens: int = 0
    phase: PullPhase = PullPhase.QUEUED
    failure: TransferFailure | None = None
    layers_done: int = 0
    pulled_bytes: int = 0
    first_token: int | None = None  # params.first_token, or pulled from the store when the params lack it
    fetch_first_token: bool = True  # False: an engine that recomputes the last prompt token needs none
    # a prefix load (a router's hint) gives the pulled tokens' ids: its chunks are looked up first (never waited
    # for), and with keep_copies a pull of them from another host's store is kept in the own one (localcopy.py)
    tokens: tuple[int, ...] = ()
    tenant: str = ""  # the request's cache_salt (the kept copy is booked to it)
    source: str = ""  # the store it was pulled from (set by the puller: its own, when that holds it all)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    _progress: threading.Condition = field(default_factory=threading.Condition, repr=False)

    @property
    def request_id(self) -> str:
        return self.params.request_id

    @property
    def settled(self) -> bool:
        return self.phase in (PullPhase.DONE, PullPhase.FAILED)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Ask the worker to stop before its next round trip (the request was aborted)."""
        self._cancelled.set()
        with self._progress:
            self._progress.notify_all()

    def advance(self, layers_done: int) -> None:
        with self._progress:
            self.layers_done = layers_done
            self._progress.notify_all()

    def settle(self, failure: TransferFailure | None) -> None:
        with self._progress:
            self.failure = failure
            self.phase = PullPhase.FAILED if failure is not None else PullPhase.DONE
            self.finished = time.monotonic()
            self._progress.notify_all()

    def wait_layer(self, layer: int, timeout: float) -> bool:
        """Block until ``layer`` is unpacked (True) or the pull settled without it / ``timeout`` passed
        (False).  For engines that run the forward pass while the pull goes on (vLLM's
        ``wait_for_layer_load``)."""
        deadline = time.monotonic() + timeout
        with self._progress:
            while self.layers_done <= layer and not self.settled:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._progress.wait(left)
            return self.layers_done > layer
