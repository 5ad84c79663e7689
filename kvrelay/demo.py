"""The `kvrelay up --demo` run: requests through the router, checked against a colocated engine.

Owns: the demo's prompts, the HTTP calls and the printed summary.  Must not touch: the cluster (the
launcher starts and stops it).  The demo passes only if every P/D answer is token-identical to the
colocated engine's and no decode had to recompute its prefill (the KV really moved).
"""

from __future__ import annotations

import json
import random
import time
import urllib.error
import urllib.request

DEMO_LENGTHS = (1, 17, 130, 333, 700, 1100, 64, 257, 900, 45)


def post(url: str, body: dict, timeout: float = 300.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{url} answered HTTP {exc.code}: {exc.read().decode(errors='replace')[:500]}") from None


def run_demo(router_url: str, colocated_url: str, n: int, max_tokens: int = 16, seed: int = 0) -> int:
    rng = random.Random(seed)
    print(f"\n{'#':>3} {'prompt':>7} {'P/D s':>7} {'colo s':>7}  match  kv")
    failures = 0
    for i in range(n):
        length = DEMO_LENGTHS[i % len(DEMO_LENGTHS)]
        prompt = [rng.randrange(3, 30000) for _ in range(length)]
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
        t0 = time.perf_counter()
        pd = post(f"{router_url}/v1/completions", body)
        t1 = time.perf_counter()
        ref = post(f"{colocated_url}/v1/completions", body)
        t2 = time.perf_counter()
        same = pd["choices"][0]["token_ids"] == ref["choices"][0]["token_ids"]
        recomputed = bool(pd.get("kvrelay", {}).get("recomputed"))
        kv = "recomputed" if recomputed else "pulled"
        failures += (not same) + recomputed
        print(f"{i:>3} {length:>7} {t1 - t0:>7.2f} {t2 - t1:>7.2f}  {'yes' if same else 'NO':<5}  {kv}")
    verdict = "all P/D outputs match the colocated engine" if not failures else f"{failures} problem(s)"
    print(f"\nkvrelay demo: {n} requests, {verdict}")
    return 0 if not failures else 1
