"""Continuous batching: which sequences run in the next step.

Owns: the waiting queue and running set.  A step is either a prefill step (new sequences, admitted
while blocks, `max_num_seqs` and the token budget allow) or a decode step (one token for every running
sequence); when the cache runs out mid-decode the youngest sequence is preempted (its blocks freed,
recomputed later).  Sequences being pulled (decode role) hold blocks but are outside both until their
KV has arrived.  Must not touch: the model, the cache tensors, transports.
"""

from __future__ import annotations

from collections import deque

from kvrelay.engines.reference.block_manager import BlockManager
from kvrelay.engines.reference.config import EngineConfig
from kvrelay.engines.reference.sequence import Sequence, Status


class Scheduler:
    def __init__(self, cfg: EngineConfig, blocks: BlockManager) -> None:
        self.cfg = cfg
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.pulling: dict[int, Sequence] = {}
        self.num_preempted = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def num_active(self) -> int:
        return len(self.running) + len(self.pulling)

    def schedule_prefill(self) -> list[Sequence]:
        """Admit waiting sequences (allocating their blocks) for a prefill step."""
        batch: list[Sequence] = []
        tokens = 0
        while self.waiting and self.num_active() + len(batch) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            if seq.kv_params is not None:
                break  # decode-role admissions are handled by the engine (they pull instead)
            need = len(seq)
            if batch and tokens + need > self.cfg.max_num_batched_tokens:
                break
            if not self.blocks.can_allocate(seq):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq)
            tokens += need - seq.num_cached_tokens
            seq.status = Status.RUNNING
            batch.append(seq)
        return batch

    def schedule_decode(self) -> list[Sequence]:
        """Every running sequence, after making room for its next token (preempting if needed)."""
        batch: list[Sequence] = []
        queue = list(self.running)
        while queue:
            seq = queue.pop(0)
            while not self.blocks.can_append(seq):
                victim = queue.pop() if queue else seq
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.may_append(seq)
                batch.append(seq)
        self.running = [s for s in self.running if s.status is Status.RUNNING]
        return batch

    def preempt(self, seq: Sequence) -> None:
        self.num_preempted += 1
        seq.status = Status.WAITING
        self.blocks.free_seq(seq)
        seq.num_computed = 0
        seq.kv_params = None  # a preempted decode-role sequence recomputes its prompt locally
        if seq in self.running:
            self.running.remove(seq)
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        self.pulling.pop(seq.seq_id, None)
