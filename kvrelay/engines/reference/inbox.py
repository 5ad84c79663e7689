"""Messages to the engine thread: small dataclasses, handled with ``match`` in `Engine._handle`.

Owns: the message types.  Must not touch: anything else.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvrelay.engines.reference.sequence import Sequence


@dataclass(frozen=True, slots=True)
class AddSequence:
    seq: Sequence


@dataclass(frozen=True, slots=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True, slots=True)
class Published:
    """The publisher settled ``seq``'s publish state: its blocks are free to reuse."""

    seq: Sequence


@dataclass(frozen=True, slots=True)
class Pulled:
    """The puller settled ``seq``'s pull state (DONE or FAILED)."""

    seq: Sequence


@dataclass(frozen=True, slots=True)
class Wake:
    """Stop waiting for messages (the engine is stopping)."""


InboxMessage = AddSequence | AbortRequest | Published | Pulled | Wake
