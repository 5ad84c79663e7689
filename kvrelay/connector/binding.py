"""What a publisher or a puller needs to know of the engine it serves: the paged cache and its layout,
the model's identity, and where to count.  An engine builds one `EngineCache` and binds its hooks to it.

Owns: `EngineCache`.  Must not touch: the cache contents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from kvrelay.connector.metrics import TransferMetrics
from kvrelay.kernels.layout import KVLayout, LayerTensors


@dataclass(frozen=True)
class EngineCache:
    layout: KVLayout
    layers: Sequence[LayerTensors]  # the paged cache, one entry per layer, in `layout`'s shape
    model_id: str
    compat_hash: str  # layout.compat_hash(model_id)
    epoch: str  # the engine process's epoch id (a restarted engine is a new peer)
    metrics: TransferMetrics

    def __post_init__(self) -> None:
        if len(self.layers) != self.layout.num_layers:
            raise ValueError(f"the cache has {len(self.layers)} layers, its layout {self.layout.num_layers}")
