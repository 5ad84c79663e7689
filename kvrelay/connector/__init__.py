"""The engine-independent KV publisher (prefill side) and puller (decode side).

Every engine adapter uses these and none copies them: the reference engine (`kvrelay.engines.reference`)
today, the vLLM connector and the Dynamo worker next.  They import kernels, transfer, the store client's
interface and keys, and never an engine.

Reading path (each file has one job):
  state.py       FailureCode, TransferFailure, PublishState / PullState and their phases
  addressing.py  a request's chunk plan, the first-token key, KVTransferParams of a prompt
  binding.py     EngineCache: the layout, cache tensors and identity an engine binds its hooks to
  messages.py    jobs sent to the publisher thread
  publisher.py   LayerPublisher: reserve, pack + commit layer by layer on a thread, settle
  puller.py      LayerPuller: pull_many + unpack layer by layer on worker threads, settle
  metrics.py     TransferMetrics: the Prometheus counters both report to
  breaker.py     CircuitBreaker: skip a dead store or peer at once instead of each caller timing out
"""

from kvrelay.connector.addressing import chunk_ranges, first_token_key, transfer_params
from kvrelay.connector.binding import BlockCodec, EngineCache
from kvrelay.connector.breaker import BreakerState, CircuitBreaker
from kvrelay.connector.metrics import TransferMetrics
from kvrelay.connector.publisher import LayerPublisher, PublishRequest
from kvrelay.connector.puller import LayerPuller
from kvrelay.connector.state import (
    FailureCode, PublishPhase, PublishState, PullPhase, PullState, TransferError, TransferFailure)

__all__ = [
    "BlockCodec", "BreakerState", "CircuitBreaker", "EngineCache", "FailureCode", "LayerPublisher", "LayerPuller", "PublishPhase", "PublishRequest",
    "PublishState", "PullPhase", "PullState", "TransferError", "TransferFailure", "TransferMetrics",
    "chunk_ranges", "first_token_key", "transfer_params",
]
