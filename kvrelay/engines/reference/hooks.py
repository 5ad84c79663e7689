"""The engine's P/D hook points, as protocols (implemented by `kvrelay.connector.LayerPublisher` and
`kvrelay.connector.LayerPuller`; kv_connector.py builds them).

Called from the engine thread:
  hook.bind(cache)                          once, when the engine is built (its layout and cache tensors)
  KVPublisher.begin(requests) -> states     before a prefill step, with the requests that publish
  KVPublisher.layer_done(layer)             after that layer's KV is written (inside the forward pass)
  KVPublisher.end(states, first_tokens, done)  after sampling; ``done(state)`` once the request settled
Called from any thread:
  KVPublisher.abort(request_id, reason)     the request was aborted: publish no further layer of it and
                                            give its store reservation back; ``done`` still comes
  KVPuller.check_store(address)             ValueError unless the puller may pull from that store (a decode
                                            leg naming its prefill's store is refused at once otherwise)
  KVPuller.start(state, deadline, done)     a decode request's blocks are allocated; ``done(state)`` once
                                            every block is filled or the pull failed (``state.failure``)
  KVPuller.cancel(state, reason)            the request was aborted while pulling: stop (its wait in the
                                            store ends at once); ``done`` still comes once it settled
Both hooks' callbacks come from other threads; the engine only enqueues them.  Must not touch:
anything else.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

from kvrelay.connector import EngineCache, PublishRequest, PublishState, PullState


class KVPublisher(Protocol):
    def bind(self, cache: EngineCache) -> None: ...
    def begin(self, requests: Sequence[PublishRequest]) -> list[PublishState]: ...
    def layer_done(self, layer: int) -> None: ...
    def end(self, states: Sequence[PublishState], first_tokens: Sequence[int],
            done: Callable[[PublishState], None]) -> None: ...
    def abort(self, request_id: str, reason: str) -> bool: ...
    def close(self) -> None: ...


class KVPuller(Protocol):
    store_address: str

    @property
    def transport(self) -> str: ...

    def check_store(self, address: str) -> None: ...
    def bind(self, cache: EngineCache) -> None: ...
    def start(self, state: PullState, deadline: float, done: Callable[[PullState], None]) -> None: ...
    def cancel(self, state: PullState, reason: str = ...) -> None: ...
    def close(self) -> None: ...
