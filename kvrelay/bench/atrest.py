"""`kvrelay bench atrest`: what sealing the SSD tier costs, and what one tenant learns from another's cache.

Owns: two measurements, each against a baseline of the same run.  Must not touch: the store's rules.

1. spill: the spiller's disk write (`SsdTier.append` of 4 MiB chunks from page-aligned memory, the store's
   O_DIRECT choice), sealed with AES-256-GCM against unsealed, in alternating rounds; target >= 0.8x.
2. side channel: a router over a store, a prefill and a decode reference engine.  Tenant alice publishes
   prompts (cache_salt "alice"); tenant mallory then sends alice's prompts (a probe of a stored prefix) and
   prompts nobody sent (a cold miss), interleaved in random order, and the client's TTFT (first streamed
   token) is taken for each.  A two-sample Kolmogorov-Smirnov test compares the two distributions: target
   p > 0.05 (nothing to tell them apart).  Control, to show the measurement can see a hit: alice's own
   repeat of her prompts against the misses (a real hit: expected p far below 0.05, and faster).
"""

from __future__ import annotations

import json
import mmap
import os
import random
import shutil
import statistics
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np

from kvrelay import proc
from kvrelay.bench.harness import BenchContext, Record
from kvrelay.keys import ChunkKey
from kvrelay.store.crypto import KeyRing
from kvrelay.store.process import DaemonProcess
from kvrelay.store.ssd import SsdTier
from kvrelay.transfer.wire import ChunkHeader, checksum

SUITE = "atrest"


def ks_2samp(a: list[float], b: list[float]) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov: (statistic D, asymptotic p-value) -- the Kolmogorov distribution's tail
    at the effective-size-corrected D (Numerical Recipes' ``kstwo``)."""
    xa, xb = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    both = np.concatenate([xa, xb])
    d = float(np.max(np.abs(np.searchsorted(xa, both, side="right") / len(xa)
                            - np.searchsorted(xb, both, side="right") / len(xb))))
    en = np.sqrt(len(xa) * len(xb) / (len(xa) + len(xb)))
    lam = (en + 0.12 + 0.11 / en) * d
    j = np.arange(1, 101)
    p = float(2 * np.sum((-1.0) ** (j - 1) * np.exp(-2 * j ** 2 * lam ** 2))) if lam > 0 else 1.0
    return d, min(max(p, 0.0), 1.0)


def _spill(ctx: BenchContext) -> None:
    chunk, n = 4 << 20, (12 if ctx.quick else 48)
    rounds = 3 if ctx.quick else 5
    buf = mmap.mmap(-1, chunk)
    buf.write(os.urandom(chunk))
    header = ChunkHeader(compat_hash="bench", layer=0, token_start=0, token_end=256, head_start=0, head_end=8,
                         dtype="uint8", nbytes=chunk, checksum=checksum(buf))
    ring = KeyRing([(1, os.urandom(32))])
    rates: dict[bool, list[float]] = {False: [], True: []}
    direct = False
    for _ in ctx.steps(range(rounds), "spill rounds"):
        for sealed in (False, True):
            d = Path(tempfile.mkdtemp(prefix="kvrelay-bench-atrest-"))
            try:
                tier = SsdTier(str(d), 2 * n * chunk, 256 << 20, "auto", keyring=ring if sealed else None)
                tier.recover()
                direct = tier.direct
                t0 = time.perf_counter()
                for i in range(n):
                    tier.append(ChunkKey(f"{i:032x}", 0, 0, 8), header, memoryview(buf), "bench-tenant")
                rates[sealed].append(n * chunk / (time.perf_counter() - t0) / 1e9)
                tier.close()
            finally:
                shutil.rmtree(d, ignore_errors=True)
    buf.close()
    ctx.add(Record.compare(SUITE, "spill/sealed", "write_gbps", statistics.median(rates[True]), "GB/s",
                           "spill/plain", statistics.median(rates[False]),
                           {"chunk_bytes": chunk, "chunks": n, "rounds": rounds, "o_direct": direct, "target": 0.8}))


def _start(tmp: Path, args: list[str], procs: list[proc.ChildProcess]) -> str:
    child = proc.spawn_kvrelay([*args, "--port", "0", "--log-level", "WARNING"], name=args[0],
                               ready_file=tmp / f"ready-{uuid.uuid4().hex[:6]}.json",
                               log=tmp / f"{args[0]}-{len(procs)}.log", log_mode="ab")
    procs.append(child)
    return str(child.wait_ready(180)["url"])


def _ttft(url: str, prompt: list[int], salt: str) -> float:
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "stream": True, "cache_salt": salt}
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        first = 0.0
        for line in r:
            if line.startswith(b"data: {") and not first:
                first = time.perf_counter() - t0
        if not first:
            raise RuntimeError(f"no token streamed back for a {len(prompt)}-token prompt")
        return first


def _side_channel(ctx: BenchContext) -> None:
    n, tokens = (10, 256) if ctx.quick else (30, 384)
    rng = random.Random(16)
    prompts = [[rng.randrange(300, 30000) for _ in range(tokens)] for _ in range(2 * n + 1)]
    stored, cold, warm = prompts[:n], prompts[n:2 * n], prompts[-1]
    tmp = Path(tempfile.mkdtemp(prefix="kvrelay-bench-atrest-"))
    procs: list[proc.ChildProcess] = []
    store = DaemonProcess(pool_size="512MiB").start()
    try:
        eng = ["--store", store.address, "--num-layers", "4", "--block-size", "16", "--chunk-tokens", "128",
               "--num-blocks", "4096", "--threads", "1"]
        prefill = _start(tmp, ["engine", "--role", "prefill", *eng], procs)
        decode = _start(tmp, ["engine", "--role", "decode", *eng], procs)
        router = _start(tmp, ["router", "--prefill", prefill, "--decode", decode, "--store", store.address], procs)
        for _ in range(3):
            _ttft(router, warm, "warm-up")
        for p in ctx.steps(stored, "alice publishes"):
            _ttft(router, p, "alice")
        probe: list[float] = []
        miss: list[float] = []
        hit: list[float] = []
        jobs = [(kind, i) for i in range(n) for kind in ("probe", "miss", "hit")]
        rng.shuffle(jobs)
        for kind, i in ctx.steps(jobs, "probes, misses and hits"):
            if kind == "probe":
                probe.append(_ttft(router, stored[i], "mallory"))
            elif kind == "miss":
                miss.append(_ttft(router, cold[i], "mallory"))
            else:
                hit.append(_ttft(router, stored[i], "alice"))
    finally:
        proc.stop_all(procs, 20.0)
        store.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    params = {"requests_each": n, "prompt_tokens": tokens, "layers": 4}
    d, p = ks_2samp(probe, miss)
    ctx.add(Record.compare(SUITE, "ttft/cross-tenant-probe", "median_ms", 1e3 * statistics.median(probe), "ms",
                           "ttft/cold-miss", 1e3 * statistics.median(miss),
                           {**params, "ks_d": round(d, 3), "ks_p": round(p, 4), "target": "ks_p > 0.05"},
                           lower_is_better=True))
    d, p = ks_2samp(hit, miss)
    ctx.add(Record.compare(SUITE, "ttft/same-tenant-hit (control)", "median_ms", 1e3 * statistics.median(hit), "ms",
                           "ttft/cold-miss", 1e3 * statistics.median(miss),
                           {**params, "ks_d": round(d, 3), "ks_p": round(p, 6),
                            "expect": "ks_p << 0.05: the measurement sees a real hit"}, lower_is_better=True))


def run(ctx: BenchContext) -> None:
    _spill(ctx)
    _side_channel(ctx)
