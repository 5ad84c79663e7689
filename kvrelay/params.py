"""`KVTransferParams`: what a prefill hands to a decode so it can find a request's KV.

One msgspec struct shared by the reference engine, the router, the vLLM connector and the Dynamo
integration.  It travels inside HTTP bodies (JSON) and ZMQ messages (msgpack); keep it flat and
versioned.  Beside it, the names of the P/D protocol's keys inside a request's ``kv_transfer_params``
(`DO_REMOTE_DECODE`, `DO_REMOTE_PREFILL`, `RELAY_ID`, `STORE_ADDRESS`, `PREFIX_STORE`, `PREFIX_TOKENS`): every module that writes or reads them uses
these.  Must not touch: transports or the store (it only names them).

Versions:
  1  first version.
"""

from __future__ import annotations

import msgspec

PARAMS_VERSION = 1

# Keys inside a request's ``kv_transfer_params`` (vLLM's proxy conventions, as its own connectors use them):
DO_REMOTE_DECODE = "do_remote_decode"  # a prefill leg: publish the prompt's KV for a decode elsewhere
DO_REMOTE_PREFILL = "do_remote_prefill"  # a decode leg: pull the prompt's KV that a prefill elsewhere publishes
# kvrelay's own: both legs' shared request id (vLLM names each leg's request itself), so that the router can
# send the two legs at once and a prefill's abort in the store reaches the decode's waiting pulls
RELAY_ID = "kvrelay_request_id"
# kvrelay's own, in a decode leg's light form: the store its prefill publishes into (a store on every host: the
# decode pulls from it), the same name as the full params' field; absent: the decode's own store
STORE_ADDRESS = "store_address"
# kvrelay's own, a hint in a request its decode worker computes itself (no do_remote_prefill): the store
# PREFIX_STORE (another host's, or "" for the engine's own) holds the prompt's first PREFIX_TOKENS tokens; the
# engine loads the whole chunks among them from there and computes the rest (prefix reuse across hosts)
PREFIX_STORE = "kvrelay_prefix_store"
PREFIX_TOKENS = "kvrelay_prefix_tokens"


class KVTransferParams(msgspec.Struct, kw_only=True):
    request_id: str
    model_id: str
    compat_hash: str  # KVLayout.compat_hash(model_id) of the prefill side
    num_tokens: int  # prompt tokens whose KV is published
    chunk_tokens: int  # tokens per content-addressed chunk (the hash-chain block)
    block_hashes: list[str]  # hex hash chain, one per chunk of chunk_tokens (the last may be partial)
    num_layers: int
    head_start: int  # head range the prefill published
    head_end: int
    head_slices: int = 1  # ... cut into this many equal ranges, a chunk each (tensor parallelism: kvrelay.connector.heads)
    store_address: str  # control address of the store daemon, e.g. "tcp://127.0.0.1:5600"
    transport: str  # transport the decode should pull with from the store: a STORE_TRANSPORTS name ("shm", "tcp", "nixl")
    first_token: int | None = None  # the prefill's sampled token, once known
    prefill_epoch: str = ""  # epoch id of the prefill process (stale metadata is dropped)
    version: int = PARAMS_VERSION

    def to_json(self) -> bytes:
        return msgspec.json.encode(self)

    @classmethod
    def from_json(cls, data: bytes | str) -> "KVTransferParams":
        try:
            params = msgspec.json.decode(data, type=cls)
        except msgspec.DecodeError as exc:
            raise ValueError(f"malformed kv_transfer_params: {exc}") from None
        params.check()
        return params

    @classmethod
    def from_dict(cls, data: dict) -> "KVTransferParams":
        try:
            params = msgspec.convert(data, type=cls)
        except msgspec.ValidationError as exc:
            raise ValueError(f"malformed kv_transfer_params: {exc}") from None
        params.check()
        return params

    def check(self) -> None:
        if self.version != PARAMS_VERSION:
            raise ValueError(f"kv_transfer_params version {self.version} is not supported (expected {PARAMS_VERSION})")
        if self.num_tokens < 0 or self.chunk_tokens <= 0:
            raise ValueError(f"kv_transfer_params: bad num_tokens={self.num_tokens} / chunk_tokens={self.chunk_tokens}")
        if not 0 <= self.head_start < self.head_end or self.head_slices < 1 or \
                (self.head_end - self.head_start) % self.head_slices:
            raise ValueError(f"kv_transfer_params: heads [{self.head_start}, {self.head_end}) cannot be cut into "
                             f"{self.head_slices} equal slices")
        want = -(-self.num_tokens // self.chunk_tokens)
        if len(self.block_hashes) != want:
            raise ValueError(f"kv_transfer_params: {len(self.block_hashes)} block hashes for {self.num_tokens} tokens "
                             f"in chunks of {self.chunk_tokens} (expected {want})")
