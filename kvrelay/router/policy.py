"""Where a request goes: its (prefill, decode) pair, or a decode worker alone, and why.

Policies (``--policy``): ``round_robin``, ``least_loaded`` (fewest requests in flight), and
``cache_aware``, which scores each worker by the prompt tokens it would have to compute after cache
credit plus the work already on it as the engine feels it (Dynamo's KV router cost: overlap weight x new
prefill blocks + active blocks; here in tokens, so workers and the store may use different block sizes),
among the workers that the anti-herding guard leaves eligible (balance.py):

    credit(w)      = sum over the longest cached prefix of w (or of the store, which every worker loads
                     from) of block tokens x tier weight (device 1.0, host 0.75, disk 0.25)
    load(w)        = tokens held on w (a prefill worker: prompt tokens queued and running, after their
                     credit; a decode worker: the KV tokens of the sequences it decodes) + request_tokens x
                     its requests (a request's fixed cost, about 20 ms = 32 tokens of prefill on the
                     reference engine); its requests: this router's own, exact, plus those the engine's
                     /metrics showed beyond them at the last probe (other routers, direct clients)
    prefill cost   = overlap_weight x (prompt tokens - credit) + load(w)
    decode cost    = load(w) - overlap_weight / 2 x own credit (its own prefix is not pulled)
    eligible       = workers whose requests are at most the idlest's + balance_abs, or at most
                     balance_rel x the idlest's (SGLang's thresholds, per worker)
    choice         = least cost among the eligible (temperature > 0: Dynamo's softmax draw)

Why this one (measured by `kvrelay bench router`, numbers in the README): the cost alone herds whenever
the credit is wrong or understates the work (a stale view of an engine that evicted the prefix; a whole
wave of requests for one prefix arriving before its blocks exist), and the softmax draw only spreads
requests among workers of near-equal cost, which a hot prefix never makes.  A guard in requests caps the
queue a hot prefix may build on its holder at a few requests; beyond it the next worker takes the prefix
once and then shares it.  Where the cache tells no worker apart (no credit anywhere, or the same
everywhere), cache_aware picks as least_loaded does, by requests in flight: balancing unique prompts by
tokens measured a median TTFT 1.27x least_loaded's (one full run; after the change 1.18x, within the
spread of that workload).  round_robin or least_loaded remain the choice when prompts share nothing
(cache_aware pays for hashing the prompt).  Measured on the
shared-prefix workload against round robin (TTFT p50, p99, requests/s; development runs of 1-2 repeats):
cost alone 1.13-1.33x, 2.1-2.4x, 0.52-0.59x (herding); guard at 2, 4 and 8 requests 0.50-0.58x,
0.82-1.03x, 1.27-1.37x; guard 4 with temperature 0.3: 0.63x, 1.45x, 0.95x.  Default: guard 4, no sampling.

Conditional disaggregation (every policy; the index's rules only where events are followed):
- ``short_prompt``: fewer than ``min_prefill_tokens`` prompt tokens: a decode worker computes it alone.
- ``decode_holds_prefix``: a decode worker's own cache credits at least ``decode_hit`` of the prompt: it
  computes the rest alone (no transfer).
- ``store_holds_prompt``: the store holds every chunk of the prompt: no prefill leg, the decode pulls it.
With a store on every host, each store's events are followed under its control address (``--events
tcp://HOST:PORT=PUB``): the store holding the longest prefix (among those whose breaker is closed) is the
request's hint (`Hint`), and
- ``store_holds_prompt`` again, where it holds the whole prompt: the decode pulls it from that store;
- ``store_holds_prefix``, where it holds at least ``decode_hit`` of the prompt: a decode worker computes the
  request alone, told (signed params: ``kvrelay.params.PREFIX_STORE``/``PREFIX_TOKENS``) to load that prefix
  from the store first (prefix reuse across hosts: the engine pulls it through its peer-store clients).
Otherwise ``pd``: both legs.  Decisions are counted by reason (metrics.py).

Owns: `Policy` (the costs), `Decision`, `Disagg`.  Must not touch: the index's contents (kvindex.py), the load
counts (pool.py), HTTP (legs.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kvrelay.router.balance import Balance
from kvrelay.router.kvindex import KVIndex, Match, prompt_hashes
from kvrelay.router.pool import NoWorkerError, Pool, Worker

POLICIES = ("round_robin", "least_loaded", "cache_aware")
TIER_WEIGHT = {"device": 1.0, "host": 0.75, "disk": 0.25}
STORE = "store"  # the index's name for the store's events (one store); a store on every host: its address


def is_store(source: str) -> bool:
    """Whether an event source names a store of its own (a store on every host: its control address)."""
    return source.startswith("tcp://")


@dataclass(slots=True, frozen=True)
class Disagg:
    """The thresholds of conditional disaggregation (0 / above 1: the rule is off)."""
    min_prefill_tokens: int = 0
    decode_hit: float = 0.8
    store_whole: bool = True
    store_prefix: bool = True  # a store on every host: store_holds_prefix (decode_hit of the prompt in one store)

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
    store: str | None = None  # store_holds_prompt with a store on every host: the store the decode pulls from
    prefix: "Hint | None" = None  # store_holds_prefix: where the decode loads the prompt's first tokens from


@dataclass(slots=True, frozen=True)
class Hint:
    """A store (its control address) that holds the prompt's first ``tokens`` (``whole``: all of it)."""
    store: str
    tokens: int
    whole: bool


def credit(match: Match, prompt_tokens: int) -> float:
    """Prompt tokens a cached prefix spares, weighted by tier."""
    weighted = sum(TIER_WEIGHT[t] * n * match.block_size for t, n in match.blocks.items())
    return min(float(prompt_tokens), weighted)


class Policy:
    def __init__(self, name: str, index: KVIndex | None = None, disagg: Disagg | None = None,
                 overlap_weight: float = 1.0, balance: Balance | None = None) -> None:
        if name not in POLICIES:
            raise ValueError(f"unknown pairing policy {name!r}; choose one of {', '.join(POLICIES)}")
        if not (math.isfinite(overlap_weight) and overlap_weight >= 0):
            raise ValueError(f"--overlap-weight {overlap_weight:g}: must be a non-negative number")
        self.name, self.index, self.disagg, self.overlap_weight = name, index, disagg or Disagg(), overlap_weight
        self.balance = balance or Balance()
        self.followed: set[str] = set()  # sources whose events the index follows (others: recorded routing)
        self.store_up: Callable[[str], bool] = lambda address: True  # a store's breaker is closed (app.py)

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
            hint = self.hint(hashes, n)
            if hint is not None and hint.whole and self.disagg.store_whole:
                return Decision("store_holds_prompt", self._pick_decode(decode, decoders, hashes, n), None, True, n,
                                store=hint.store)
            if hint is not None and self.disagg.store_prefix and hint.tokens >= self.disagg.decode_hit * n:
                return Decision("store_holds_prefix", self._decode_alone(decode, decoders, hashes, n), None, False,
                                n, prefix=hint)
        p = self._pick_prefill(prefill, hashes, n)
        return Decision("pd", self._pick_decode(decode, decoders, hashes, n), p, True, n,
                        prefill_tokens=round(n - self._credit(p.url, hashes, n)))

    def stores(self) -> Iterable[str]:
        """The stores of a store on every host whose events the index follows, by control address."""
        return sorted(s for s in self.followed if is_store(s))

    def hint(self, hashes: dict[int, list[int]], n: int) -> Hint | None:
        """The store (of a store on every host, its breaker closed) holding the longest prefix of the prompt
        (ties: the one with more of it in memory, then by address), or None where none holds any."""
        if self.index is None or not hashes:
            return None
        best: tuple[int, int, str] | None = None
        whole = False
        for address in self.stores():
            if not self.store_up(address):
                continue
            m = self.index.match(address, hashes)
            held = sum(m.blocks.values())
            key = (min(n, held * m.block_size), m.blocks.get("host", 0), address)
            if held and (best is None or key[:2] > best[:2]):
                best, whole = key, held == m.prompt_blocks
        return Hint(best[2], best[0], whole) if best is not None else None

    def _credit(self, url: str, hashes: dict[int, list[int]], n: int) -> float:
        if self.index is None or not hashes:
            return 0.0
        return max(credit(self.index.match(url, hashes), n), credit(self.index.match(STORE, hashes), n))

    def load(self, w: Worker) -> float:
        """The work on ``w`` as its engine feels it, in prompt tokens: the tokens held (a prefill worker's to
        compute, a decode worker's KV) plus a fixed cost per request (per sequence on a decode worker)."""
        return w.load_tokens + self.balance.request_tokens * w.depth

    def _choose(self, pool: Pool, cost: Callable[[Worker], float]) -> Worker:
        """cache_aware's choice in ``pool``: the least ``cost`` among the workers the guard leaves eligible."""
        workers = pool.healthy()
        if not workers:
            pool.pick()  # raises NoWorkerError naming the workers
            raise NoWorkerError(f"no healthy {pool.role} worker available")
        return self.balance.choose(self.balance.eligible(workers, lambda w: w.depth), cost)

    def _by_cache(self, pool: Pool, credit_of: Callable[[Worker], float]) -> dict[str, float] | None:
        """Each healthy worker's credit, or None where the cache tells no two of them apart (no credit
        anywhere, or the same everywhere, as for a prefix only the store holds): cache_aware then picks as
        least_loaded does, by requests in flight, which measured better than balancing by tokens on prompts
        that share nothing (the unique-prompt workload of `kvrelay bench router`)."""
        if self.name != "cache_aware" or not pool.healthy():
            return None
        credits = {w.url: credit_of(w) for w in pool.healthy()}
        return credits if max(credits.values()) > min(credits.values()) else None

    def _pick_prefill(self, pool: Pool, hashes: dict[int, list[int]], n: int) -> Worker:
        c = self._by_cache(pool, lambda w: self._credit(w.url, hashes, n)) if hashes else None
        if c is None:
            return pool.pick()
        return self._choose(pool, lambda w: self.overlap_weight * (n - c[w.url]) + self.load(w))

    def _own(self, w: Worker, hashes: dict[int, list[int]], n: int) -> float:
        return credit(self.index.match(w.url, hashes), n) if self.index is not None and hashes else 0.0

    def _pick_decode(self, pool: Pool, decoders: list[Worker], hashes: dict[int, list[int]], n: int) -> Worker:
        """P/D: the decode's own cached prefix is not pulled (a lesser saving than a prefill's: counted at
        half weight), plus the load it holds for requests in flight."""
        c = self._by_cache(pool, lambda w: self._own(w, hashes, n)) if hashes else None
        if c is None:
            return pool.pick()
        return self._choose(pool, lambda w: self.load(w) - 0.5 * self.overlap_weight * c[w.url])

    def _decode_alone(self, pool: Pool, decoders: list[Worker], hashes: dict[int, list[int]], n: int) -> Worker:
        """A decode worker that computes the prompt itself: cost = tokens left after its own cache + its load."""
        c = self._by_cache(pool, lambda w: self._own(w, hashes, n)) if hashes else None
        if c is None:
            return pool.pick()
        return self._choose(pool, lambda w: self.overlap_weight * (n - c[w.url]) + self.load(w))
