"""The engine's P/D hook points, as protocols (implemented by kv_publish.py and kv_pull.py).

Called from the engine thread:
  KVPublisher.begin(engine, seqs)            before a prefill step, with the requests that publish
  KVPublisher.layer_done(layer)              after that layer's KV is written (inside the forward pass)
  KVPublisher.end(seqs, first_tokens, done)  after sampling; ``done(seq)`` once every layer is committed
  KVPuller.start(engine, seq, done)          a decode request's blocks are allocated; ``done(seq, reason)``
                                             (reason None on success) once every block is filled or never
Both hooks' callbacks may come from other threads; the engine only enqueues them.  Must not touch:
anything else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

from kvrelay.engines.reference.sequence import Sequence

if TYPE_CHECKING:
    from kvrelay.engines.reference.engine import Engine


class KVPublisher(Protocol):
    def begin(self, engine: "Engine", seqs: list[Sequence]) -> None: ...
    def layer_done(self, layer: int) -> None: ...
    def end(self, seqs: list[Sequence], first_tokens: list[int], done: Callable[[Sequence], None]) -> None: ...
    def close(self) -> None: ...


class KVPuller(Protocol):
    def start(self, engine: "Engine", seq: Sequence,
              done: Callable[[Sequence, str | None], None]) -> None: ...
    def close(self) -> None: ...
