"""GPU check for the Triton pack/unpack kernels: `python -m kvrelay.kernels.gpu_check [--quick]`.

Owns: a short, standalone run on real CUDA tensors: (1) byte-exact round trips against the torch
reference across orders, dtypes, block sizes and TP head slicing; (2) pack/unpack bandwidth for a
Llama-3-8B-like layer beside a device-to-device copy of the same bytes and the device's peak DRAM
bandwidth (read + write traffic).  Exits 0 with a "no CUDA" message on machines without a GPU, 1 if
any check fails.  Must not touch: anything but the tensors it allocates.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import torch

from kvrelay.kernels import KVLayout, pack, unpack
from kvrelay.kernels.device import device_peak_gbps

CASES = [  # (order, fused, dtype, src block, dst block, total heads, src tp, dst tp, head_dim)
    ("NHD", True, torch.bfloat16, 16, 32, 8, 1, 2, 128),
    ("NHD", False, torch.float16, 128, 16, 8, 2, 1, 128),
    ("HND", True, torch.float32, 16, 16, 4, 1, 1, 64),
    ("HND", False, torch.float8_e4m3fn, 32, 16, 8, 1, 4, 128),
    ("CPU", True, torch.bfloat16, 16, 16, 4, 2, 1, 80),
    ("MLA", True, torch.bfloat16, 64, 16, 1, 1, 1, 576),
    ("NHD", True, torch.float8_e5m2, 16, 8, 2, 1, 2, 33),
]


def _layouts(order, fused, dtype, bs, total, tp, d, nb):
    per = total // tp
    return [KVLayout(num_layers=1, num_blocks=nb, block_size=bs, num_kv_heads=per, head_dim=d, dtype=dtype,
                     order=order, kv_fused=fused, head_start=r * per, total_kv_heads=total) for r in range(tp)]


def _random_layer(layout: KVLayout, gen: torch.Generator, device: str):
    def one():
        t = torch.empty(layout.tensor_shape(), dtype=layout.dtype, device=device)
        b = t.view(torch.uint8)
        b.copy_(torch.randint(0, 256, b.shape, dtype=torch.uint8, generator=gen).to(device))
        return t
    return one() if layout.fused else (one(), one())


def _same(a, b) -> bool:
    ta = (a,) if isinstance(a, torch.Tensor) else a
    tb = (b,) if isinstance(b, torch.Tensor) else b
    return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(ta, tb, strict=True))


def _clone(layer):
    return layer.clone() if isinstance(layer, torch.Tensor) else (layer[0].clone(), layer[1].clone())


def check_exact(tokens: int = 300, device: str = "cuda") -> list[str]:
    """Triton (impl=None on CUDA; forced, through the interpreter, on CPU) vs the reference; failed case names."""
    impl = "triton"
    failures = []
    gen = torch.Generator().manual_seed(0)
    for order, fused, dtype, bs_s, bs_d, total, tp_s, tp_d, d in CASES:
        name = f"{order} fused={fused} {dtype} block {bs_s}->{bs_d} tp {tp_s}->{tp_d} d={d}"
        start, end = 7, tokens - 3
        nb_s, nb_d = -(-tokens // bs_s) + 3, -(-tokens // bs_d) + 3
        ids_s = torch.randperm(nb_s, generator=gen)[: -(-tokens // bs_s)]
        ids_d = torch.randperm(nb_d, generator=gen)[: -(-tokens // bs_d)]
        chunks = []
        for lay in _layouts(order, fused, dtype, bs_s, total, tp_s, d, nb_s):
            layer = _random_layer(lay, gen, device)
            out = torch.zeros(lay.chunk_nbytes(end - start), dtype=torch.uint8, device=device)
            ref = out.clone()
            pack(lay, layer, ids_s.to(device), start, end, out, impl=impl)
            pack(lay, layer, ids_s, start, end, ref, impl="torch")
            if not torch.equal(out, ref):
                failures.append(f"pack {name}")
            chunks.append((lay.head_start, lay.head_end, ref))
        for lay in _layouts(order, fused, dtype, bs_d, total, tp_d, d, nb_d):
            got = _random_layer(lay, gen, device)
            want = _clone(got)
            for h0, h1, chunk in chunks:
                if h1 <= lay.head_start or h0 >= lay.head_end:
                    continue
                unpack(lay, got, ids_d, start, end, chunk, h0, h1, impl=impl)
                unpack(lay, want, ids_d, start, end, chunk, h0, h1, impl="torch")
            if not _same(got, want):
                failures.append(f"unpack {name}")
        print(f"  {'FAIL' if any(name in f for f in failures) else 'ok  '} {name}")
    return failures


def _time(fn, repeat: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bandwidth(tokens_list: list[int], repeat: int) -> None:
    peak, source = device_peak_gbps()
    print(f"device peak {peak:.0f} GB/s ({source}); traffic = read + write bytes")
    for tokens in tokens_list:
        need = tokens // 16
        lay = KVLayout(num_layers=1, num_blocks=need + need // 4, block_size=16, num_kv_heads=8, head_dim=128,
                       dtype=torch.bfloat16)
        layer = torch.ones(lay.tensor_shape(), dtype=lay.dtype, device="cuda")
        ids = torch.randperm(lay.num_blocks, device="cuda")[:need]
        chunk = torch.empty(lay.chunk_nbytes(tokens), dtype=torch.uint8, device="cuda")
        other = torch.empty_like(chunk)
        secs = {"copy_": _time(functools.partial(other.copy_, chunk), repeat),
                "pack": _time(functools.partial(pack, lay, layer, ids, 0, tokens, chunk), repeat),
                "unpack": _time(functools.partial(unpack, lay, layer, ids, 0, tokens, chunk, 0, 8), repeat)}
        parts = [f"{k} {2 * chunk.numel() / s / 1e9:7.0f} GB/s ({2 * chunk.numel() / s / 1e9 / peak:.2f} of peak)"
                 for k, s in secs.items()]
        print(f"  {tokens:6d} tokens ({chunk.numel() / 2**20:.0f} MiB): " + ", ".join(parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvrelay.kernels.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check (the Triton kernels are tested on CPU under TRITON_INTERPRET=1)")
        return 0
    print(f"device: {torch.cuda.get_device_name()}")
    print("byte-exact round trips (Triton vs torch reference):")
    failures = check_exact()
    print("bandwidth (Llama-3-8B-like layer, NHD fused bf16, block 16, scattered blocks):")
    bandwidth([2048, 32768] if args.quick else [2048, 8192, 32768, 131072], 10 if args.quick else 30)
    if failures:
        print(f"FAILED: {len(failures)} checks: {failures}")
        return 1
    print("all byte-exact checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
