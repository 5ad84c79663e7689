"""Continuous batching: which sequences run in the next step.

Owns: the waiting queue and running set.  A step is either a prefill step (new sequences, admitted
while blocks, `max_num_seqs` and the token budget allow) or a decode step (one token for every running
sequence); when the cache runs out mid-decode the youngest sequence is preempted (its blocks freed,
recomputed later).  Sequences whose prompt KV is pulled (decode role) are admitted by `schedule_pulls`:
they hold blocks but are outside both until their KV has arrived (`pull_finished`), or go back to the
front of the queue to be recomputed (`requeue_front`).  The engine asks; it never edits the queues.
Must not touch: the model, the cache tensors, transports.
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

    def schedule_pulls(self) -> list[Sequence]:
        """Admit the waiting decode-role sequences at the head of the queue (their prompt KV comes from
        the store) while ``max_num_seqs`` and blocks allow: their blocks are allocated (prefix-cache hits
        included, not yet registered) and they are PULLING until `pull_finished`."""
        admitted: list[Sequence] = []
        while self.waiting and self.waiting[0].kv_params is not None:
            seq = self.waiting[0]
            kp = seq.kv_params
            if kp is None or self.num_active() >= self.cfg.max_num_seqs:
                break
            # room for the prompt and the prefill's first token (a placeholder until the pull knows it); a prefix
            # load (seq.prefix_load) pulls only kp.num_tokens and computes the rest: no first token to hold
            seq.output = [] if seq.prefix_load else [0 if kp.first_token is None else kp.first_token]
            if not self.blocks.can_allocate(seq):
                seq.output = []
                break
            self.waiting.popleft()
            self.blocks.allocate(seq, cacheable_tokens=kp.num_tokens if seq.prefix_load else len(seq.prompt),
                                 register=False)
            seq.status = Status.PULLING
            self.pulling[seq.seq_id] = seq
            admitted.append(seq)
        return admitted

    def pull_finished(self, seq: Sequence, ok: bool) -> None:
        """A pull settled.  ``ok``: the prompt's KV is in the blocks and ``seq`` runs (its first token is
        emitted next); else the caller frees its blocks and fails or `requeue_front`s it."""
        self.pulling.pop(seq.seq_id, None)
        if ok:
            self.blocks.register(seq, len(seq.prompt))
            seq.num_computed = len(seq.prompt)
            seq.status = Status.RUNNING
            self.running.append(seq)

    def requeue_front(self, seq: Sequence) -> None:
        """Back to the head of the queue (it has waited already), to be prefilled here."""
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def start_decoding(self, seq: Sequence) -> None:
        """A sequence whose prefill step just ran keeps running (decode steps)."""
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take ``seq`` out of the waiting queue, if it is there (it is being failed or aborted)."""
        if seq in self.waiting:
            self.waiting.remove(seq)

    def active(self) -> list[Sequence]:
        """Running and waiting sequences (not those being pulled)."""
        return list(self.running) + list(self.waiting)

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
