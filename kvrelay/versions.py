"""Protocol version numbers, in a module with no dependencies so that light processes (the store
daemon, the router) can check them without importing torch.

WIRE_VERSION: the chunk byte order and ChunkHeader (history in kvrelay/transfer/wire.py).
"""

WIRE_VERSION = 2
