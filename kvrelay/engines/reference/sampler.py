"""Token sampling: greedy (temperature 0) and temperature sampling with an optional per-request seed.

Owns: turning one step's logits into token ids.  Must not touch: sequences' state.
"""

from __future__ import annotations

import torch

from kvrelay.engines.reference.sequence import Sequence


class Sampler:
    def __init__(self) -> None:
        self._gens: dict[int, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """One token per row of ``logits`` [len(seqs), vocab]."""
        out = logits.argmax(-1).tolist()
        for i, seq in enumerate(seqs):
            t = seq.params.temperature
            if t > 0:
                probs = torch.softmax(logits[i].double() / t, -1)
                out[i] = int(torch.multinomial(probs, 1, generator=self._gen(seq)).item())
        return out

    def _gen(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None:
            return None
        g = self._gens.get(seq.seq_id)
        if g is None:
            g = self._gens[seq.seq_id] = torch.Generator().manual_seed(seq.params.seed)
        return g

    def forget(self, seq: Sequence) -> None:
        self._gens.pop(seq.seq_id, None)
