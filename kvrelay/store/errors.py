"""The store's error codes: one enum for the daemon, the wire protocol, the client and the connector.

Owns: `StoreCode` (the closed set of reasons the store refuses a request or a client gives up on it; the
value is what travels in `protocol.Reply.code`), `OpError` (what the daemon's core raises to refuse a
request; the server turns it into a reply) and `StoreError` / `StoreFullError` (what the client raises).
Where each code goes: the daemon sends every code but the client-only ones (`StoreCode.wire`); the client
raises `StoreFullError` for FULL, `TimeoutError` for TIMEOUT and `StoreError` for the rest
(`control.py`); the connector maps each code to a `FailureCode` (`connector/state.py`).  A test checks
that every member has its mapping in each place.  Must not touch: anything else (this module imports
nothing from kvrelay, so every layer above the base may import it).
"""

from __future__ import annotations

import enum


class StoreCode(enum.StrEnum):
    """Why the store refused a request, or why the client gave up on it.  A StrEnum: a member compares equal
    to its string, so ``code == "full"`` and a dict keyed by the strings keep working."""

    BAD_REQUEST = "bad_request"  # malformed or invalid (sizes, TTL, headers, an unknown op)
    VERSION = "version"  # the peer speaks another protocol version
    SESSION = "session"  # the daemon does not know this client socket: say hello first (it restarted?)
    FULL = "full"  # admission: the pool cannot hold the chunks even after eviction
    QUOTA = "quota"  # admission: the tenant is over its quota even after evicting its own chunks
    NOT_FOUND = "not_found"  # no such chunk or reservation (expired, released)
    CORRUPT = "corrupt"  # a chunk failed its checksum (on commit, on SSD, or at the client)
    TIMEOUT = "timeout"  # a wait the caller bounded ran out
    ABORTED = "aborted"  # the request's publisher gave up (protocol.Abort)
    MISMATCH = "mismatch"  # the request's publisher reserved none of the pulled chunks (another prompt)
    INTERNAL = "internal"  # a bug in the daemon or an impossible answer
    # raised by the client itself, never sent by the daemon
    CLOSED = "closed"  # the StoreClient is closed
    UNREACHABLE = "unreachable"  # the daemon did not answer or its connection went away

    @property
    def wire(self) -> bool:
        """Whether the daemon sends this code in a reply (the client-only codes never cross the wire)."""
        return self not in _CLIENT_ONLY


_CLIENT_ONLY = frozenset({StoreCode.CLOSED, StoreCode.UNREACHABLE})


class OpError(Exception):
    """A request the store refuses; ``code`` goes into the reply.  An unknown code is a bug (ValueError)."""

    def __init__(self, code: StoreCode | str, message: str) -> None:
        super().__init__(message)
        self.code = StoreCode(code)


class StoreError(RuntimeError):
    """The store refused a request or could not be reached; ``code`` says why (a `StoreCode` value, or the
    string a newer daemon sent)."""

    def __init__(self, message: str, code: StoreCode | str = StoreCode.INTERNAL) -> None:
        super().__init__(message)
        self.code: StoreCode | str = _known(code)


class StoreFullError(StoreError):
    """Admission refused: the pool cannot hold the request's chunks even after eviction."""


def _known(code: StoreCode | str) -> StoreCode | str:
    try:
        return StoreCode(code)
    except ValueError:
        return code


__all__ = ["OpError", "StoreCode", "StoreError", "StoreFullError"]
