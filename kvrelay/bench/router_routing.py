"""`kvrelay bench router`, the routing case: routing quality per policy on three workloads, with spreads.

Each workload is sent in waves (every request of a wave at once, a wave after the previous one ended)
through one router per policy (round_robin, least_loaded, cache_aware; cache_aware follows every engine's
KV events, so it knows what each engine's paged cache holds) over the same cluster of 2 prefill and 2
decode reference engines (kvrelay.bench.router starts it):

  shared_prefix  a few long system prompts, many users, several turns each (each turn extends the user's
                 history): a cache-aware router can keep each system prompt on one prefill engine, where
                 round robin makes both hold all of them (more than their caches hold).
  unique         prompts of varied length that share nothing: no cache helps, so cache_aware must match
                 least_loaded (within 5% on TTFT p50, p99 and requests/s is the target).
  hot_prefix     one system prompt shared by most requests (7 of 8), the rest unique: the herding case,
                 where a cache-aware router may pile requests onto the prefix's holder.

Every (workload, policy) run is repeated R times (R = 3 in a full run, 1 with ``--quick``), the policies in
a rotated order each repeat, each run with its own tokens (the shapes are the same: no run inherits
another's warm caches).  Each figure is the median of its R runs, set against round robin's median (the
unique workload: also against least_loaded's), with the min and max of the runs and of the per-repeat
ratios in its params.  Every answer is checked: after all runs, each body is sent to the decode engines
directly and its greedy text must equal the routed one.

`kvrelay bench router_routing` runs this case alone (on router.py's cluster, without its other cases).

Owns: the routing workloads and their records.  Must not touch: the cluster (router.py starts it), the
router or the engines.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvrelay.bench.harness import BenchContext, Record, percentile
from kvrelay.bench.loadgen import load

SUITE = "router"
POLICIES = ("round_robin", "least_loaded", "cache_aware")
WORKLOADS = ("shared_prefix", "unique", "hot_prefix")
VOCAB = (256, 4096)  # token ids drawn from here (the engines' vocabulary is 4096)
Waves = list[list[dict]]


def _body(prompt: list[int]) -> dict:
    return {"prompt": prompt, "max_tokens": 4, "temperature": 0.0, "ignore_eos": True}


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(*VOCAB) for _ in range(n)]


def shared_prefix(seed: int, quick: bool) -> Waves:
    """Turn t of every user, sent together; each turn extends the user's history by 64 tokens."""
    systems, users, turns, sys_len = (2, 4, 2, 128) if quick else (4, 16, 4, 1536)
    rng = random.Random(seed)
    prefixes = [_tokens(rng, sys_len) for _ in range(systems)]
    history = {u: list(prefixes[u % systems]) for u in range(users)}
    waves = []
    for _ in range(turns):
        for u in range(users):
            history[u] = history[u] + _tokens(rng, 64)
        waves.append([_body(list(history[u])) for u in range(users)])
    return waves


def unique(seed: int, quick: bool) -> Waves:
    """Prompts sharing nothing; their lengths are the same for every seed (only the tokens differ)."""
    waves, per_wave, lo, hi = (2, 4, 48, 160) if quick else (4, 16, 128, 1024)
    lengths = random.Random(0)
    rng = random.Random(seed)
    return [[_body(_tokens(rng, lengths.randrange(lo, hi))) for _ in range(per_wave)] for _ in range(waves)]


def hot_prefix(seed: int, quick: bool) -> Waves:
    """One system prompt shared by 7 of every 8 requests (with a suffix of its own), the 8th unique."""
    waves, per_wave, sys_len = (2, 8, 128) if quick else (4, 16, 1536)
    shape = random.Random(0)
    rng = random.Random(seed)
    hot = _tokens(rng, sys_len)
    out = []
    for _ in range(waves):
        wave = []
        for i in range(per_wave):
            suffix = _tokens(rng, shape.randrange(32, 193))
            wave.append(_body(hot + suffix if i % 8 else _tokens(rng, sys_len) + suffix))
        out.append(wave)
    return out


BUILDERS: dict[str, Callable[[int, bool], Waves]] = {"shared_prefix": shared_prefix, "unique": unique,
                                                     "hot_prefix": hot_prefix}


@dataclass
class Run:
    """One (workload, policy) run: its TTFTs, wall seconds and requests; its waves and answers (checked later)."""
    ttft: list[float] = field(default_factory=list)
    wall: float = 0.0
    n: int = 0
    sent: list[tuple[list[dict], dict]] = field(default_factory=list)

    def figures(self) -> dict[str, float]:
        return {"ttft_p50_ms": percentile(self.ttft, 50) * 1000, "ttft_p99_ms": percentile(self.ttft, 99) * 1000,
                "requests_per_s": self.n / self.wall}


def one_run(url: str, waves: Waves) -> Run:
    run = Run()
    for wave in waves:
        res = load([url], wave, len(wave))
        run.sent.append((wave, res))
        run.ttft += [r["ttft"] for r in res["results"]]
        run.wall += res["wall"]
        run.n += len(wave)
    return run


def check_answers(decode: list[str], runs: list[tuple[str, Run]]) -> None:
    """Every routed answer equals the decode engines' own to the same body (greedy), sent after every run."""
    sent = [(what, wave, res) for what, run in runs for wave, res in run.sent]
    bodies = [b for _, wave, _ in sent for b in wave]
    direct = load(decode, bodies, max(len(w) for _, w, _ in sent))["results"]
    for what, wave, res in sent:
        want, direct = direct[:len(wave)], direct[len(wave):]
        wrong = [i for i, (a, b) in enumerate(zip(res["results"], want, strict=True)) if a["text"] != b["text"]]
        if wrong:
            raise RuntimeError(f"routing {what}: {len(wrong)} answers differ from the engines' own, e.g. "
                               f"{res['results'][wrong[0]]['text']!r} != {want[wrong[0]]['text']!r}")


def routing(ctx: BenchContext, start_router: Callable[[str, list[str]], str], decode: list[str],
            events: list[str], repeats: int | None = None) -> None:
    """``start_router(name, extra flags)``: a router over the cluster, its URL; ``events``: the engines'
    ``--events`` specs (cache_aware follows them)."""
    r_count = repeats or (1 if ctx.quick else 3)
    urls = {}
    for policy in POLICIES:
        extra = ["--policy", policy] + [a for spec in events for a in ("--events", spec)] * (policy == "cache_aware")
        urls[policy] = start_router(f"router_{policy}", extra)
    figures: dict[tuple[str, str], list[dict[str, float]]] = {}
    runs: list[tuple[str, Run]] = []
    seed = 100
    for workload in WORKLOADS:
        t0 = time.monotonic()
        for r in range(r_count):
            order = POLICIES[r % 3:] + POLICIES[:r % 3]
            for policy in order:
                seed += 1
                run = one_run(urls[policy], BUILDERS[workload](seed, ctx.quick))
                runs.append((f"{workload} with {policy}", run))
                figures.setdefault((workload, policy), []).append(run.figures())
        print(f"router bench: routing/{workload}: {r_count} repeats in {time.monotonic() - t0:.0f} s",
              file=sys.stderr)
    check_answers(decode, runs)
    for workload in WORKLOADS:
        n = sum(len(w) for w in BUILDERS[workload](0, ctx.quick))
        bases = ["round_robin"] + (["least_loaded"] if workload == "unique" else [])
        for policy in POLICIES:
            for base in bases:
                if policy == base and base != "round_robin":
                    continue
                for metric, unit in (("ttft_p50_ms", "ms"), ("ttft_p99_ms", "ms"), ("requests_per_s", "req/s")):
                    ctx.add(_record(workload, policy, base, metric, unit, figures, n, r_count, ctx.quick))


def _record(workload: str, policy: str, base: str, metric: str, unit: str,
            figures: dict[tuple[str, str], list[dict[str, float]]], n: int, repeats: int, quick: bool) -> Record:
    """The median of ``policy``'s runs against the median of ``base``'s; the spreads in params."""
    got = [f[metric] for f in figures[(workload, policy)]]
    ref = [f[metric] for f in figures[(workload, base)]]
    lower = metric != "requests_per_s"
    ratios = [(b / a if lower else a / b) for a, b in zip(got, ref, strict=True)]  # per repeat, higher is better
    params = {"requests": n, "repeats": repeats, "quick": quick, "min": min(got), "max": max(got),
              "ratio_min": min(ratios), "ratio_max": max(ratios), "runs": [round(x, 2) for x in got]}
    case = f"routing/{workload}/{policy}"
    metric_name = metric if base == "round_robin" else f"{metric}_vs_{base}"
    return Record.compare(SUITE, case, metric_name, statistics.median(got), unit, f"{base} median",
                          statistics.median(ref), params, lower_is_better=lower)
