"""What the scheduler-side connector tells the worker-side one each step (pickled by vLLM).  The keys
inside ``kv_transfer_params`` are kvrelay.params' (`DO_REMOTE_DECODE`, `DO_REMOTE_PREFILL`, `RELAY_ID`).

Owns: `LoadSpec`, `SaveSpec`.  Must not touch: anything else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

@dataclass(frozen=True, slots=True)
class LoadSpec:
    """Pull the prompt KV of ``req_id`` into ``block_ids`` (covering the prompt from token 0), skipping the
    first ``skip_tokens`` (this instance's own prefix cache holds them), up to ``num_tokens``."""

    req_id: str  # vLLM's request id (reported back in finished_recving)
    relay_id: str  # the request id the prefill publishes under (store aborts reach pulls through it)
    block_hashes: list[str]
    num_tokens: int
    block_ids: list[int]
    skip_tokens: int
    deadline_s: float  # the pull gives up (and vLLM recomputes) this long after it starts
    store: str = ""  # the store to pull from (a store on every host: the prefill's); "": this instance's own
    head_slices: int = 1  # the publisher cut the KV heads into this many chunks (tensor parallelism)


@dataclass(frozen=True, slots=True)
class SaveSpec:
    """Publish the prompt KV of ``req_id`` (its prompt is complete in the cache after this step's forward)."""

    req_id: str
    relay_id: str
    token_ids: list[int]
    block_ids: list[int]
    stored_tokens: int = 0  # loaded from the store in this request: those chunks are there already
    cache_salt: str = ""  # the request's tenant salt (in its chunks' addresses; their owner in the store)


@dataclass
class StepMeta:
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)  # requests whose blocks vLLM reuses from this step on
    aborted: list[str] = field(default_factory=list)  # relay ids of requests vLLM aborted while they were saved:
    #                                                   their publish stops and gives its reservation back
