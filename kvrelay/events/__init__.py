"""KV events in vLLM's wire format: who holds which blocks, published by the store and the engines.

Reading path: `wire` (the frames and structs), `publisher` (PUB + replay ROUTER, non-blocking for the data
path), `subscriber` (gap detection, replay, snapshot resync), `view` (a consumer that rebuilds each
source's block sets), `hashing` (block hashes at the consumer's block size).
"""
