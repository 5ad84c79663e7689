"""A request as the engine sees it: prompt, generated tokens, sampling parameters, block table, and
(decode role) where its prompt KV comes from.

Owns: per-request state (the transfer state is typed, in kvrelay.connector.state).  Must not touch: the
cache, other sequences.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from kvrelay.params import KVTransferParams

if TYPE_CHECKING:
    import torch

    from kvrelay.connector import PublishState, PullState, TransferFailure

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    PULLING = "pulling"  # decode role: blocks allocated, KV arriving from the store
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 100):
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")


# Called from the engine thread for every new token: (seq, token_id, finished).
TokenCallback = Callable[["Sequence", int, bool], None]


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    params: SamplingParams
    request_id: str = ""
    on_token: TokenCallback | None = None
    # prefill role: stop after the first token and publish the prompt's KV
    publish: bool = False
    # decode role: the prompt's KV comes from the store
    kv_params: KVTransferParams | None = None
    # decode role: kv_params cover only a prefix another store holds (a router's hint): loaded, then the rest computed
    prefix_load: bool = False
    cache_salt: str = ""  # the tenant's salt: seeds this engine's prefix-cache hashes and the store addresses
    seq_id: int = field(default_factory=lambda: next(_ids))
    output: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens whose KV was found in this engine's prefix cache
    num_computed: int = 0  # tokens whose KV is in the cache
    finish_reason: str | None = None
    error: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    # P/D transfer state (kvrelay.connector): prefill role publishing, decode role pulling
    publish_state: PublishState | None = None
    pull_state: PullState | None = None
    recomputed: TransferFailure | None = None  # decode role: why the pull failed and the prompt was recomputed
    logits: list[torch.Tensor] | None = None  # tests: each sampled row's logits (Engine.record_logits)

    def __post_init__(self) -> None:
        if not self.request_id:
            self.request_id = f"req-{self.seq_id}"

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def __len__(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def last_token(self) -> int:
        return self.output[-1] if self.output else self.prompt[-1]

    def num_blocks(self, block_size: int) -> int:
        return -(-len(self) // block_size)
