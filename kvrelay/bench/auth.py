"""`kvrelay bench auth`: what authentication costs on the tcp data plane, measured in one run.

Three peer processes serve a region over the tcp transport: without keys (the baseline), with keys
(authenticated: a handshake per connection and a MAC per request header, kvrelay/security/
dataplane.py) and with keys and encryption (CURVE).  One client reads and writes each in turn,
transfer by transfer, so load on the shared host hits all three alike.  Records: each mode's throughput
against the unauthenticated path (target: authenticated >= 0.9x), and, for reference, one AES-256-GCM
pass over the same bytes (the ``cryptography`` package, AES-NI) against a copy: what encrypting chunk by
chunk in our own code would cost instead of CURVE.

Owns: this benchmark.  Must not touch: the transports.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import ExitStack

import numpy as np

from kvrelay import proc
from kvrelay.bench.harness import BenchContext, Record, median
from kvrelay.bench.peers import KIB, MIB, Op, endpoint_ops, measure_interleaved

SIZES_FULL = (64 * KIB, 1 * MIB, 4 * MIB, 16 * MIB)
SIZES_QUICK = (64 * KIB, 1 * MIB, 4 * MIB)
MODES = ("plain", "auth", "encrypt")  # the baseline first


def serve(mode: str, nbytes: int, keys_dir: str) -> None:
    """A peer: a tcp endpoint (``mode``) with one region of ``nbytes``; prints its address, runs until stdin closes."""
    from kvrelay import security
    from kvrelay.transfer import create_transport
    keys = security.load(keys_dir) if mode != "plain" else None
    with security.using(keys):
        ep = create_transport("tcp", f"bench-auth-{mode}", "bench", encrypt=mode == "encrypt")
    info, view = ep.alloc(nbytes)
    (np.frombuffer(view, np.uint8) if isinstance(view, memoryview) else view.numpy())[:] = 7
    print(json.dumps({"address": ep.address, "region": info.region_id}), flush=True)
    sys.stdin.read()
    ep.close()


def _spawn(mode: str, nbytes: int, keys_dir: str, stack: ExitStack) -> dict:
    child = proc.spawn([sys.executable, "-m", "kvrelay.bench.auth", "--serve", mode, str(nbytes), keys_dir],
                       name=f"the {mode} peer", pipes=True)
    stack.callback(child.close_pipes)
    stack.callback(child.stop, 30.0, sig=None)  # its stdin closed: it closes its endpoint and exits
    return child.read_json_line(300.0)


def _ops(mode: str, meta: dict, nbytes: int, keys_dir: str, stack: ExitStack) -> dict[str, Op]:
    from kvrelay import security
    from kvrelay.transfer import create_transport
    with security.using(security.load(keys_dir) if mode != "plain" else None):
        ep = create_transport("tcp", f"bench-auth-client-{mode}", "bench")
    return endpoint_ops(ep, meta, nbytes, stack)


def _aes_gcm(n: int, quick: bool) -> tuple[float, float] | None:
    """(AES-256-GCM GB/s, copy GB/s) over n bytes, or None without the cryptography package."""
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:
        return None
    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    src = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()
    dst = bytearray(n)
    nonce = os.urandom(12)
    reps = 10 if quick else 40
    enc, cpy = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        aead.encrypt(nonce, src, None)
        enc.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dst[:] = src
        cpy.append(time.perf_counter() - t0)
    return n / median(enc) / 1e9, n / median(cpy) / 1e9


def run(ctx: BenchContext) -> None:
    sizes = SIZES_QUICK if ctx.quick else SIZES_FULL
    nbytes = max(sizes)
    from kvrelay import security
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="kvrelay-bench-keys-") as tmp:
        keys_dir = str(security.write_keys(os.path.join(tmp, "keys")))
        ops = {}
        for mode in MODES:
            meta = _spawn(mode, nbytes, keys_dir, stack)
            ops[mode] = _ops(mode, meta, nbytes, keys_dir, stack)
        for op in ("read", "write"):
            for n in ctx.steps(sizes, f"{op} sizes"):
                res = measure_interleaved({m: o[op] for m, o in ops.items()}, n, ctx.quick)
                base = res["plain"][0]
                for mode in ("auth", "encrypt"):
                    ctx.add(Record.compare("auth", f"tcp-{mode}/{op}/{n // KIB}KiB", "throughput", res[mode][0],
                                           "GB/s", "tcp-plain", base, {"mode": mode, "op": op, "bytes": n}))
                    ctx.add(Record.compare("auth", f"tcp-{mode}/{op}/{n // KIB}KiB", "latency_p50", res[mode][1],
                                           "us", "tcp-plain", res["plain"][1], {"mode": mode, "op": op, "bytes": n},
                                           lower_is_better=True))
    aes = _aes_gcm(MIB, ctx.quick)
    if aes is not None:
        ctx.add(Record.compare("auth", "aes-256-gcm/1024KiB", "throughput", aes[0], "GB/s", "copy", aes[1],
                               {"bytes": MIB, "note": "one encrypt pass, cryptography (OpenSSL, AES-NI)"}))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--serve", nargs=3, metavar=("MODE", "NBYTES", "KEYS"), required=True)
    a = p.parse_args()
    serve(a.serve[0], int(a.serve[1]), a.serve[2])
