"""The rendezvous tier: the `kvrelay store` daemon and its client.

Reading path: protocol.py (what crosses the control socket) -> client.py (the API engines call) ->
server.py (the ZMQ loop, waiters, aborts) -> core.py (admission, eviction, leases) -> spill.py and
promote.py (the background threads to and from SSD) -> index.py, pool.py, ssd.py (data structures and
the on-disk format) -> daemon.py (wiring), config.py, metrics.py.
datapath.py moves bytes for a client (mapped pool, or a kvrelay.transfer endpoint); process.py starts a
daemon as a child process.  Must not touch: chunk layouts (kernels/) or transport internals (transfer/).
"""
