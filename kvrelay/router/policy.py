"""Where a request goes: its (prefill, decode) pair, or a decode worker alone, and why.

Policies (``--policy``): ``round_robin``, ``least_loaded`` (fewest requests in flight), and
``cache_aware``, which scores each worker by the prompt tokens it would have to compute after cache
credit plus the work already queued on it (Dynamo's KV router cost: overlap weight x new prefill blocks +
active blocks; here in tokens, so workers and the store may use different block sizes):

    credit(w)      = sum over the longest cached prefix of w (or of the store, which every worker loads
                     from) of block tokens x tier weight (device 1.0, host 0.75, disk 0.25)
    prefill cost   = overlap_weight x (prompt tokens - credit) + tokens queued for prefill on w
    decode cost    = tokens of the requests w is decoding (its KV held: Dynamo's active blocks)

Conditional disaggregation (every policy; the index's rules only where events are followed):
- ``short_prompt``: fewer than ``min_prefill_tokens`` prompt tokens: a decode worker computes it alone.
- ``decode_holds_prefix``: a decode worker's own cache credits at least ``decode_hit`` of the prompt: it
  computes the rest alone (no transfer).
- ``store_holds_prompt``: the store holds every chunk of the prompt: no prefill leg, the decode pulls it.
Otherwise ``pd``: both legs.  Decisions are counted by reason (metrics.py).

Owns: `Policy`, `Decision`, `Disagg`.  Must not touch: the index's contents (kvindex.py), HTTP (legs.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvrelay.router.kvindex import KVIndex, Match, prompt_hashes
from kvrelay.router.pool import Pool, Worker

POLICIES = ("round_robin", "least_loaded", "cache_aware")
TIER_WEIGHT = {"device": 1.0, "host": 0.75, "disk": 0.25}
STORE = "store"  # the index's name for the store's events


@dataclass(slots=True, frozen=True)
class Disagg:
    """The thresholds of conditional disaggregation (0 / above 1: the rule is off)."""
    min_prefill_tokens: int = 0
    decode_hit: float = 0.8
    store_whole: bool = True

    def __post_init__(self) -> None:
        if self.min_prefill_tokens < 0:
            raise ValueError(f"--decode-only-below {self.min_prefill_tokens}: must be 0 (off) or a number of "
                             f"prompt tokens")
        if not (math.isfinite(self.decode_hit) and self.decode_hit > 0):
            raise ValueError(f"--decode-only-hit {self.decode_hit:g}: must be a fraction of the prompt in (0, 1] "
                             f"(above 1: off)")


@dataclass(slots=True)
class Decision:
    reason: str  # pd, short_prompt, decode_holds_prefix, store_holds_prompt
    decode: Worker
    prefill: Worker | None  # None: no prefill leg
    pull: bool  # the decode leg pulls the prompt's KV (do_remote_prefill)
    prompt_tokens: int = 0
    prefill_tokens: int = 0  # tokens the prefill worker computes (its queued load while in flight)


def credit(match: Match, prompt_tokens: int) -> float:
    """Prompt tokens a cached prefix spares, weighted by tier."""
    weighted = sum(TIER_WEIGHT[t] * n * match.block_size for t, n in match.blocks.items())
    return min(float(prompt_tokens), weighted)


class Policy:
    def __init__(self, name: str, index: KVIndex | None = None, disagg: Disagg | None = None,
                 overlap_weight: float = 1.0) -> None:
        if name not in POLICIES:
            raise ValueError(f"unknown pairing policy {name!r}; choose one of {', '.join(POLICIES)}")
        if not (math.isfinite(overlap_weight) and overlap_weight >= 0):
            raise ValueError(f"--overlap-weight {overlap_weight:g}: must be a non-negative number")
        self.name, self.index, self.disagg, self.overlap_weight = name, index, disagg or Disagg(), overlap_weight
        self.followed: set[str] = set()  # sources whose events the index follows (others: recorded routing)

    @property
    def needs_tokens(self) -> bool:
        """Whether a decision reads the prompt's tokens (else the router need not tokenize)."""
        return self.name == "cache_aware" or self.disagg.min_prefill_tokens > 0 or self.index is not None

    def routed(self, d: Decision, tokens: list[int] | None, salt: str = "") -> None:
        """Note where a prompt went, for workers whose events are not followed (kvindex.record)."""
        if self.index is None or not tokens or self.name != "cache_aware":
            return
        hashes = prompt_hashes(tokens, [self.index.approx_block_size], salt)
        for w in (d.prefill, d.decode):
            if w is not None and w.url not in self.followed:
                self.index.record(w.url, hashes)

    def decide(self, prefill: Pool, decode: Pool, tokens: list[int] | None, store_up: bool = True,
               salt: str = "") -> Decision:
        """The route of one request over the workers in service (NoWorkerError: no decode worker in service;
        the caller handles "no prefill worker" and "store down" before).  ``salt``: the request's tenant
        (cache_salt), which seeds its block names as the publishers' events do, so one tenant is never
        credited with, nor routed past its prefill by, another tenant's cache."""
        n = len(tokens) if tokens is not None else 0
        hashes = prompt_hashes(tokens, self.index.block_sizes(), salt) if self.index is not None and tokens \
            else {}
        decoders = decode.healthy()
        if tokens is not None and n < self.disagg.min_prefill_tokens:
            return Decision("short_prompt", self._decode_alone(decode, decoders, hashes, n), None, False, n)
        index = self.index
        if hashes and decoders and index is not None:
            if max(credit(index.match(w.url, hashes), n) for w in decoders) >= self.disagg.decode_hit * n:
                return Decision("decode_holds_prefix", self._decode_alone(decode, decoders, hashes, n), None,
                                False, n)
            store = index.match(STORE, hashes)
            if self.disagg.store_whole and store_up and store.prompt_blocks and \
                    sum(store.blocks.values()) == store.prompt_blocks:
                return Decision("store_holds_prompt", self._pick_decode(decode, decoders, hashes, n), None, True, n)
        p = self._pick_prefill(prefill, hashes, n)
        return Decision("pd", self._pick_decode(decode, decoders, hashes, n), p, True, n,
                        prefill_tokens=round(n - self._credit(p.url, hashes, n)))

    def _credit(self, url: str, hashes: dict[int, list[int]], n: int) -> float:
        if self.index is None or not hashes:
            return 0.0
        return max(credit(self.index.match(url, hashes), n), credit(self.index.match(STORE, hashes), n))

    def _pick_prefill(self, pool: Pool, hashes: dict[int, list[int]], n: int) -> Worker:
        if self.name != "cache_aware":
            return pool.pick()
        return pool.pick_by(lambda w: self.overlap_weight * (n - self._credit(w.url, hashes, n)) + w.load_tokens)

    def _pick_decode(self, pool: Pool, decoders: list[Worker], hashes: dict[int, list[int]], n: int) -> Worker:
        """P/D: the decode's own cached prefix is not pulled (a lesser saving than a prefill's: counted at
        half weight), plus the tokens it holds for requests in flight."""
        if self.name != "cache_aware":
            return pool.pick()
        index = self.index

        def cost(w: Worker) -> float:
            own = credit(index.match(w.url, hashes), n) if index is not None and hashes else 0.0
            return w.load_tokens - 0.5 * self.overlap_weight * own
        return pool.pick_by(cost)

    def _decode_alone(self, pool: Pool, decoders: list[Worker], hashes: dict[int, list[int]], n: int) -> Worker:
        """A decode worker that computes the prompt itself: cost = tokens left after its own cache + its load."""
        if self.name != "cache_aware":
            return pool.pick()
        index = self.index

        def cost(w: Worker) -> float:
            own = credit(index.match(w.url, hashes), n) if index is not None and hashes else 0.0
            return self.overlap_weight * (n - own) + w.load_tokens
        return pool.pick_by(cost)
