"""How a model's KV heads are cut into chunks, so that engines with different tensor parallelism share them.

A chunk is addressed by (content, layer, head range) (kvrelay.keys).  A publisher cuts the model's
``total`` KV heads into ``slices`` equal ranges and publishes, for each range its rank holds, one chunk per
(layer, token chunk); a puller pulls the ranges that intersect the heads its rank keeps and unpacks the
intersection.  With ``slices`` a multiple of both sides' tensor-parallel sizes every rank pulls exactly its
share; with fewer, a decode rank that keeps part of a range pulls the whole range (correct, more bytes).

Heads fewer than the ranks (1 KV head at TP 2): vLLM gives every rank of a group of ``tp // total`` the same
head; only the group's first rank publishes it (once), and every rank of the group pulls it.

Owns: `HeadSlices` and `rank_heads` (which heads a rank keeps, and which slices it publishes).  Must not
touch: the store, engines.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HeadSlices:
    """``total`` model KV heads in ``slices`` equal ranges [0, g), [g, 2g), ... (g = total // slices)."""

    total: int
    slices: int = 1

    def __post_init__(self) -> None:
        if self.total < 1 or self.slices < 1 or self.total % self.slices:
            raise ValueError(f"{self.slices} head slices do not cut {self.total} KV heads into equal ranges (the "
                             f"slice count must divide the KV head count)")

    @property
    def grain(self) -> int:
        return self.total // self.slices

    def ranges(self) -> list[tuple[int, int]]:
        g = self.grain
        return [(i * g, (i + 1) * g) for i in range(self.slices)]

    def covering(self, start: int, end: int) -> list[tuple[int, int]]:
        """The ranges a rank keeping heads [start, end) pulls: every one that intersects them."""
        return [(a, b) for a, b in self.ranges() if a < end and b > start]

    def inside(self, start: int, end: int) -> list[tuple[int, int]]:
        """The ranges a rank keeping heads [start, end) publishes: those it holds whole; ValueError where it
        holds part of one only (its heads would be published by nobody)."""
        got = [(a, b) for a, b in self.ranges() if start <= a and b <= end]
        if sum(b - a for a, b in got) != end - start:
            raise ValueError(f"a rank keeping KV heads [{start}, {end}) of {self.total} cannot publish them in "
                             f"{self.slices} slices of {self.grain} heads: use a slice count that is a multiple of "
                             f"the tensor-parallel size")
        return got


def rank_heads(total: int, tp_size: int, rank: int) -> tuple[int, int, bool]:
    """(first head, end, publishes) of the KV heads rank ``rank`` of ``tp_size`` keeps, as vLLM splits them:
    ``total // tp_size`` consecutive heads each, or with fewer heads than ranks one head per group of
    ``tp_size // total`` ranks, published by the group's first rank only."""
    if total < 1 or tp_size < 1 or not 0 <= rank < tp_size:
        raise ValueError(f"rank {rank} of tensor-parallel size {tp_size} with {total} KV heads")
    if total >= tp_size:
        if total % tp_size:
            raise ValueError(f"{total} KV heads cannot be split evenly over tensor-parallel size {tp_size}")
        per = total // tp_size
        return rank * per, (rank + 1) * per, True
    if tp_size % total:
        raise ValueError(f"{total} KV heads cannot be replicated evenly over tensor-parallel size {tp_size}")
    group = tp_size // total
    return rank // group, rank // group + 1, rank % group == 0


def default_slices(total: int, tp_size: int) -> int:
    """The slice count an engine publishes with unless told: one range per rank (``min(tp_size, total)``), so a
    TP 1 engine publishes whole chunks as before and a TP 2 one each rank's half."""
    return min(tp_size, total)
