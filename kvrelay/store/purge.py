"""Purge: drop a set of chunks on request, and for a tenant make them unrecoverable from memory and disk.

Owns: what a Purge request does (protocol.Purge) beyond selecting the chunks: overwriting a tenant's bytes
in the pool (the freed slots and every other free range, where earlier evictions may have left copies) and
on SSD (its records, head and payload), the journal's record of the purge (ssd.py `purged`: segments synced,
the journal compacted so no frame of a purged chunk survives, then a "purge" frame), and the audit log line.
Must not touch: the chunk life-cycle rules (lifecycle.py, allocation.py `drop`), sockets.

A tenant's chunks that are pinned (being pulled, leased), being written to or read from SSD, or still
reserved are skipped and counted in ``skipped``: purge again once they are released.  Chunks of the tenant
that were already deleted, expired or evicted earlier have had their record heads zeroed (ssd.py `drop`; on an
encrypted tier their payloads cannot be opened any more) or their segment removed.
"""

from __future__ import annotations

import pwd
import socket
import struct
from typing import TYPE_CHECKING, Any

import numpy as np

from kvrelay.store import protocol as P
from kvrelay.store.pool import align_up

if TYPE_CHECKING:
    from kvrelay.store.core import StoreCore
    from kvrelay.store.local import LocalListener


def peer_identity(local: LocalListener | None, ident: bytes) -> str:
    """Who is on the other end of a control connection, as the kernel vouches for it: the uid (and user) and
    pid of a same-host client (SO_PEERCRED of its Unix socket); "zmq" for a client on the ZMQ socket (with
    kvrelay.security on, a holder of the cluster's client key)."""
    conn = local.by_ident.get(ident) if local is not None else None
    if conn is None:
        return "zmq"
    try:
        pid, uid, _gid = struct.unpack("3i", conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                  struct.calcsize("3i")))
    except OSError:
        return "local"
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = "?"
    return f"local uid={uid}({user}) pid={pid}"


def purge(core: StoreCore, req: P.Purge, client: str = "", peer: str = "") -> P.Reply:
    """Answer a Purge request (the caller catches OpError); audited when the store has an audit log."""
    if req.tenant is None:
        n = core.purge(req.prefix, req.namespace)
        out: dict[str, Any] = {"chunks": n}
    else:
        out = purge_tenant(core, req.tenant, req.prefix, req.namespace)
    if core.audit is not None:
        core.audit.record("purge", by=req.by, client=client, peer=peer, tenant=req.tenant, prefix=req.prefix,
                          namespace=req.namespace, **out)
    return P.Reply(req_id=req.req_id, count=out["chunks"], info=out)


def purge_tenant(core: StoreCore, tenant: str, prefix: str | None = None, namespace: str | None = None
                 ) -> dict[str, int]:
    """Drop the tenant's ready, unpinned chunks (filtered by key ``prefix`` and ``namespace`` if given) and
    overwrite their bytes; returns {"chunks", "bytes", "skipped"}."""
    with core.lock:
        mine = [e for e in core.ix.entries.values() if e.tenant == tenant
                and (prefix is None or e.key.block_hash.startswith(prefix))
                and (namespace is None or e.namespace == namespace)]
        victims = [e for e in mine if e.pins == 0 and not e.is_busy and e.ready]
        nbytes = sum(e.nbytes for e in victims)
        for e in victims:
            core.drop(e, scrub=True)
        core.counters["purged"] += len(victims)
        core.ix.book.count(tenant, "purged_chunks", len(victims))
        if victims:
            pool = np.frombuffer(core.pool.view, dtype=np.uint8)
            for start, size in core.arena.free_ranges():
                pool[start:start + align_up(size)] = 0
            del pool
    if victims and core.ssd is not None:
        core.ssd.purged(tenant)
    return {"chunks": len(victims), "bytes": nbytes, "skipped": len(mine) - len(victims)}
