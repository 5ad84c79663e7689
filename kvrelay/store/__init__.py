"""The rendezvous tier: the `kvrelay store` daemon and its client.

Reading path: protocol.py (what crosses the control socket) -> client.py (the API engines call) and
control.py (its round trips, pipelined commits) over links.py (a thread's link: the same-host Unix socket or
ZMQ) -> server.py (the loop, waiters, aborts) and local.py (its Unix socket) -> core.py (the facade over
the parts, sharing one lock and one clock (shared.py, clock.py): admission.py, allocation.py, commit.py,
pins.py, tiering.py, upkeep.py) -> spill.py and promote.py (the background threads to and from SSD, behind
Protocols) -> lifecycle.py (a chunk's tier and busy state), index.py, pool.py, ssd.py (data structures and
the on-disk format) -> daemon.py (wiring), config.py, metrics.py.
datapath.py moves bytes for a client (mapped pool, or a kvrelay.transfer endpoint); directory.py is the
shared table of ready chunks a same-host client pulls through with no round trip; process.py starts a
daemon as a child process.  Tenants and the SSD tier at rest: tenants.py (who owns a chunk: quotas, TTLs,
usage per tenant), purge.py and audit.py (purge by tenant, and its record), crypto.py (AES-GCM keys and
sealing of SSD records), admin.py (`kvrelay store purge|keygen`).  Must not touch: chunk layouts (kernels/) or transport internals (transfer/).
"""
