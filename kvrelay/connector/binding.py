"""What a publisher or a puller needs to know of the engine it serves: the paged cache and its layout,
the model's identity, and where to count.  An engine builds one `EngineCache` and binds its hooks to it.

Owns: `EngineCache`.  Must not touch: the cache contents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from kvrelay.connector.metrics import TransferMetrics
from kvrelay.kernels import pack, unpack
from kvrelay.kernels.layout import KVLayout, LayerTensors


class BlockCodec(Protocol):
    """Pack/unpack for a cache whose in-block order `kvrelay.kernels` does not describe (vLLM's CPU
    attention: `kvrelay.kernels.permuted.PermutedBlockCodec`)."""

    def pack(self, layer: LayerTensors, block_ids: Sequence[int], token_start: int, token_end: int,
             out: torch.Tensor, head_start: int | None = None, head_end: int | None = None) -> int: ...

    def unpack(self, layer: LayerTensors, block_ids: Sequence[int], token_start: int, token_end: int,
               chunk: torch.Tensor, head_start: int, head_end: int) -> None: ...


@dataclass(frozen=True)
class EngineCache:
    layout: KVLayout
    layers: Sequence[LayerTensors]  # the paged cache, one entry per layer, in `layout`'s shape
    model_id: str
    compat_hash: str  # layout.compat_hash(model_id)
    epoch: str  # the engine process's epoch id (a restarted engine is a new peer)
    metrics: TransferMetrics
    codec: BlockCodec | None = None  # None: kvrelay.kernels.pack / unpack describe the layout

    def __post_init__(self) -> None:
        if len(self.layers) != self.layout.num_layers:
            raise ValueError(f"the cache has {len(self.layers)} layers, its layout {self.layout.num_layers}")

    def pack(self, layer: int, block_ids: Sequence[int], token_start: int, token_end: int,
             out: torch.Tensor, head_start: int | None = None, head_end: int | None = None) -> int:
        """Tokens [token_start, token_end) of ``layer`` into ``out`` in the canonical chunk order, model heads
        [head_start, head_end) (default: all this rank holds)."""
        if self.codec is not None:
            return self.codec.pack(self.layers[layer], block_ids, token_start, token_end, out, head_start, head_end)
        return pack(self.layout, self.layers[layer], list(block_ids), token_start, token_end, out, head_start, head_end)

    def unpack(self, layer: int, block_ids: Sequence[int], token_start: int, token_end: int, chunk: torch.Tensor,
               head_start: int, head_end: int) -> None:
        if self.codec is not None:
            self.codec.unpack(self.layers[layer], block_ids, token_start, token_end, chunk, head_start, head_end)
            return
        unpack(self.layout, self.layers[layer], list(block_ids), token_start, token_end, chunk, head_start, head_end)
