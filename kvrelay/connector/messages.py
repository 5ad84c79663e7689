"""Messages to the publisher thread: small dataclasses, handled with ``match``.

Owns: the job types.  Must not touch: anything else.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from kvrelay.connector.state import PublishState


@dataclass(frozen=True, slots=True)
class PublishLayer:
    """Pack and commit ``layer`` of every request in ``batch``; one flush for the layer."""

    layer: int
    batch: list[PublishState]


@dataclass(frozen=True, slots=True)
class FinishBatch:
    """After the batch's last layer: publish the first tokens, settle each request, call ``done``."""

    forward_end: float  # time.monotonic() when the forward pass ended (the publish lag starts there)
    batch: list[PublishState]
    first_tokens: list[int | None]
    done: Callable[[PublishState], None]


@dataclass(frozen=True, slots=True)
class AbortPublish:
    """``state``'s request was aborted (``state.abort_reason``): stop publishing it and give its reservation
    back to the store."""

    state: PublishState


@dataclass(frozen=True, slots=True)
class Drain:
    """Every job before this one is done: set ``done``."""

    done: threading.Event


@dataclass(frozen=True, slots=True)
class StopPublisher:
    pass


PublisherJob = PublishLayer | FinishBatch | AbortPublish | Drain | StopPublisher
