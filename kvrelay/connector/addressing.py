"""Where a request's KV lives in the store: its chunks' token ranges and keys, the key of its first
token, and the `KVTransferParams` a prefill publishes under.  A publisher and a puller (and a router
that builds the params itself) derive the same addresses from the same prompt.

Owns: the (layer, chunk) plan of a request.  Must not touch: the store, transports, engines.
"""

from __future__ import annotations

from typing import Sequence

import torch
import xxhash

from kvrelay.connector.state import ChunkJob
from kvrelay.keys import ChunkKey, block_hashes
from kvrelay.params import KVTransferParams
from kvrelay.transfer.wire import ChunkHeader, checksum

FIRST_TOKEN_BYTES = 8  # one int64


def chunk_ranges(num_tokens: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """Token ranges of a prompt's chunks: ``chunk_tokens`` each, the last one possibly partial."""
    return [(s, min(num_tokens, s + chunk_tokens)) for s in range(0, num_tokens, chunk_tokens)]


def first_token_key(request_id: str, hashes: Sequence[str]) -> ChunkKey:
    """Where the prefill publishes a request's sampled first token (8 bytes, int64), after its last
    layer: a decode leg sent before the prefill answered (``first_token`` unknown) pulls it from there.
    Keyed by request id, not content: the first token depends on sampling."""
    h = xxhash.xxh3_128_hexdigest(f"first-token|{request_id}|{hashes[-1] if hashes else ''}".encode())
    return ChunkKey(h, -1, 0, 0)


def first_token_payload(token: int) -> torch.Tensor:
    return torch.tensor([token], dtype=torch.int64).view(torch.uint8)


def first_token_header(compat_hash: str, num_tokens: int, payload: torch.Tensor) -> ChunkHeader:
    return ChunkHeader(compat_hash=compat_hash, layer=-1, token_start=num_tokens, token_end=num_tokens + 1,
                       head_start=0, head_end=0, dtype="int64", nbytes=FIRST_TOKEN_BYTES,
                       checksum=checksum(payload))


def transfer_params(prompt: Sequence[int], request_id: str, model_id: str, compat_hash: str, chunk_tokens: int,
                    num_layers: int, head_start: int, head_end: int, store_address: str, transport: str,
                    first_token: int | None = None, prefill_epoch: str = "", cache_salt: str = "",
                    head_slices: int = 1) -> KVTransferParams:
    """The `KVTransferParams` a prefill of ``prompt`` publishes under.  A router or a decode worker can
    build them itself and send the decode leg at once (``first_token=None``: the decode pulls it from the
    store).  ``cache_salt``: the request's tenant salt (kvrelay.keys), part of every chunk's address;
    ``head_slices``: heads [head_start, head_end) are published in that many equal ranges (kvrelay.connector.heads)."""
    return KVTransferParams(
        request_id=request_id, model_id=model_id, compat_hash=compat_hash, num_tokens=len(prompt),
        chunk_tokens=chunk_tokens, block_hashes=block_hashes(prompt, chunk_tokens, model_id, compat_hash, cache_salt),
        num_layers=num_layers, head_start=head_start, head_end=head_end, store_address=store_address,
        transport=transport, first_token=first_token, prefill_epoch=prefill_epoch, head_slices=head_slices)


def head_ranges(params: KVTransferParams) -> list[tuple[int, int]]:
    """The head ranges a request's chunks are published in: [head_start, head_end) in ``head_slices`` parts."""
    g = (params.head_end - params.head_start) // params.head_slices
    return [(params.head_start + i * g, params.head_start + (i + 1) * g) for i in range(params.head_slices)]


def chunk_jobs(params: KVTransferParams, heads: Sequence[tuple[int, int]] | None = None) -> list[ChunkJob]:
    """Every (layer, chunk, head range) of a request, layer-major (the order layers are computed and published);
    ``heads``: the ranges of `head_ranges` this publisher holds (default: all of them)."""
    ranges = chunk_ranges(params.num_tokens, params.chunk_tokens)
    return [ChunkJob(layer, ChunkKey(h, layer, a, b), t0, t1)
            for layer in range(params.num_layers)
            for h, (t0, t1) in zip(params.block_hashes, ranges, strict=True)
            for a, b in (head_ranges(params) if heads is None else heads)]
