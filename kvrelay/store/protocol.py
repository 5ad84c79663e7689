"""The store's control-plane protocol: msgspec structs sent over ZMQ (client DEALER -> daemon ROUTER).

Owns: the request/reply structs and their encoding.  Must not touch: storage (pool, index, SSD) or
the bytes of chunks (those move through the shared pool or a transport, never through this socket).

Every request carries ``version`` and ``req_id``; the daemon answers every request with exactly one
`Reply` carrying the same ``req_id`` (``ok=False`` plus ``error``/``code`` on failure, including
malformed messages it cannot decode, which are answered with ``req_id=-1``).

Versions:
  1  first version.  Additive since (old peers never send or read them): `PullMany`, `Reply.headers`,
     `CommitMany`, `Req.touched` and the Hello info's "directory" (an older daemon ignores ``touched``);
     tenants: ``Reserve.tenant``, ``Lookup.tenant``, ``Purge.tenant`` and ``Purge.by`` (an older daemon
     ignores them: its chunks have no owner); ``Reserve.tokens`` (KV events; an older daemon ignores it).
"""

from __future__ import annotations

from typing import Union

import msgspec

from kvrelay.keys import ChunkKey
from kvrelay.store.errors import StoreCode
from kvrelay.transfer.wire import ChunkHeader

PROTOCOL_VERSION = 1
# The compat hash the daemon's own transport endpoints announce (the store moves bytes, whatever model).
STORE_COMPAT = "kvrelay-store-v1"


class Req(msgspec.Struct, tag_field="op", kw_only=True):
    version: int = PROTOCOL_VERSION
    req_id: int = 0
    # pins the client no longer needs (piggybacked so pulls cost one round trip)
    unpin: list[int] = []
    # chunk ids the client pulled through the shared directory since its last request (LRU and counters)
    touched: list[str] = []


class Hello(Req, tag="hello"):
    name: str
    compat_hash: str
    transport: str = "shm"


class Lookup(Req, tag="lookup"):
    keys: list[ChunkKey]
    tenant: str = ""  # who asks (the request's cache_salt): its hits and misses are counted under it


class Reserve(Req, tag="reserve"):
    request_id: str
    keys: list[ChunkKey]
    nbytes: list[int]
    ttl: float = 60.0
    tenant: str = ""  # the request's cache_salt: the chunks are booked to it (quota, TTL, metrics, purge)
    tokens: list[int] = []  # the prompt's token ids: the store's KV events describe its chunks with them


class Commit(Req, tag="commit"):
    key: ChunkKey
    header: ChunkHeader


class CommitMany(Req, tag="commit_many"):
    """Several commits in one message (what `commit(wait=False)` sends, a batch at a time): each chunk is
    committed or refused on its own; the reply counts the fresh ones and, if any was refused, is not ok and
    names the first refusal and how many there were."""
    keys: list[ChunkKey]
    headers: list[ChunkHeader]


class Pull(Req, tag="pull"):
    key: ChunkKey
    timeout: float  # seconds from now the client is willing to wait
    request_id: str = ""  # answered at once with code ABORTED once this request is aborted (Abort)


class PullMany(Req, tag="pull_many"):
    """Pull several chunks with one round trip: answered once every key is ready (slots and headers in
    key order, each pinned) or with a timeout naming the first missing key."""
    keys: list[ChunkKey]
    timeout: float
    request_id: str = ""


class WaitReady(Req, tag="wait"):
    keys: list[ChunkKey]
    timeout: float
    request_id: str = ""


class Abort(Req, tag="abort"):
    """The publisher of ``request_id`` gave up (e.g. the store refused its reservation): every pull parked
    for that request, and every one that arrives in the next ABORT_TTL seconds and would have to wait, fails at
    once with code ABORTED and ``reason``, so a decode recomputes now instead of waiting for its deadline.
    Chunks already committed are still served (their bytes are complete and content-addressed; a same-host
    client pulls them through the directory without asking)."""
    request_id: str
    reason: str = ""


class Lease(Req, tag="lease"):
    keys: list[ChunkKey]
    ttl: float


class Release(Req, tag="release"):
    request_id: str = ""
    keys: list[ChunkKey] = []


class Delete(Req, tag="delete"):
    keys: list[ChunkKey] = []


class Purge(Req, tag="purge"):
    """Drop every ready, unpinned chunk matching all the filters given.  With ``tenant``, the chunks' bytes
    are also overwritten in the pool and on SSD, the purge is recorded in the SSD journal and the audit log
    (``by``: who asked, as the operator names themself), and the reply's info says chunks, bytes and the
    chunks skipped (pinned or being written: purge again)."""
    prefix: str | None = None
    namespace: str | None = None
    tenant: str | None = None
    by: str = ""


class Stats(Req, tag="stats"):
    pass


class Ping(Req, tag="ping"):
    pass


Request = Union[Hello, Lookup, Reserve, Commit, CommitMany, Pull, PullMany, WaitReady, Abort, Lease, Release, Delete,
                Purge, Stats, Ping]


class Slot(msgspec.Struct, array_like=True):
    """Where a chunk lives in the pool: ``offset``/``nbytes`` in region ``region``; ``present`` means the
    chunk was already stored (nothing to write); ``pin`` > 0 is a pin the client must give back."""

    offset: int
    nbytes: int
    present: bool = False
    pin: int = 0


class Reply(msgspec.Struct, kw_only=True, omit_defaults=True):
    req_id: int
    ok: bool = True
    code: str = ""  # on error: a `StoreCode` value (errors.py says what each means; the client-only ones are
    # never sent).  A plain string on the wire, so a client keeps decoding replies with a code it does not know.
    error: str = ""
    count: int = 0
    slots: list[Slot] = []
    header: ChunkHeader | None = None
    headers: list[ChunkHeader] = []  # PullMany: one per key, beside ``slots``
    info: dict = {}


_enc = msgspec.msgpack.Encoder()
_req_dec = msgspec.msgpack.Decoder(Request)
_rep_dec = msgspec.msgpack.Decoder(Reply)


def encode(msg: Req | Reply) -> bytes:
    return _enc.encode(msg)


class BadRequest(ValueError):
    """A request the daemon cannot decode; ``code`` is what its reply says (BAD_REQUEST, or VERSION)."""

    def __init__(self, message: str, code: StoreCode = StoreCode.BAD_REQUEST) -> None:
        super().__init__(message)
        self.code = code


def decode_request(data: bytes) -> Request:
    """Decode a request; raises BadRequest (a ValueError) naming the problem (malformed, unknown op, other
    version: code VERSION)."""
    try:
        req = _req_dec.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadRequest(f"malformed store request: {exc}") from None
    if req.version != PROTOCOL_VERSION:
        raise BadRequest(f"store protocol version {req.version} is not supported (daemon speaks "
                         f"{PROTOCOL_VERSION}); upgrade the older side", StoreCode.VERSION)
    return req


def decode_reply(data: bytes) -> Reply:
    try:
        return _rep_dec.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"malformed store reply: {exc}") from None
