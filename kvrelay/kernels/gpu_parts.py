"""The kernel parts of the GPU check (kvrelay/diagnostics/gpu_check.py runs each in a process of its own,
under its own budget).

Owns: one function per part, each returning ``{"ok": bool, ...figures}`` and raising nothing a caller
must catch (the check reports an exception as the part's error).  Outputs carry guard bytes that must
come back untouched; caches are compared whole (padding included) against the torch reference.
Must not touch: anything but the tensors, streams and processes it creates.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

import numpy as np
import torch

from kvrelay.kernels import KVLayout, cuda_path, pack, triton_kernels, unpack

GUARD = 0xA5
GUARD_BYTES = 64
SPIN = 200_000_000  # cycles of torch.cuda._sleep (~0.1 s): work queued ahead that a wrong order would overtake

# (name, order, fused, dtype, src block, dst block, total heads, src tp, dst tp, head_dim): every word width
# (8: bf16 x 128; 4: fp32 x 33; 2: bf16 x 33; 1: fp8 x 33), MLA's 576, > 1,024 words per token.
CASES = [
    ("nhd-bf16-tp1to2", "NHD", True, torch.bfloat16, 16, 32, 8, 1, 2, 128),
    ("nhd-split-fp16-tp2to1", "NHD", False, torch.float16, 128, 16, 8, 2, 1, 128),
    ("hnd-fp32-d33", "HND", True, torch.float32, 16, 16, 4, 1, 1, 33),
    ("hnd-split-bf16-d33", "HND", False, torch.bfloat16, 32, 16, 8, 1, 4, 33),
    ("nhd-fp8e5m2-d33", "NHD", True, torch.float8_e5m2, 16, 8, 2, 1, 2, 33),
    ("hnd-fp8e4m3-tp1to4", "HND", False, torch.float8_e4m3fn, 32, 16, 8, 1, 4, 128),
    ("cpu-order-bf16-d80", "CPU", True, torch.bfloat16, 16, 16, 4, 2, 1, 80),
    ("mla-bf16-576", "MLA", True, torch.bfloat16, 64, 16, 1, 1, 1, 576),
    ("wide-fp32-32x128", "NHD", True, torch.float32, 16, 16, 32, 1, 1, 128),  # 2,048 words per token
]


def _layouts(order, fused, dtype, bs, total, tp, d, nb) -> list[KVLayout]:
    per = total // tp
    return [KVLayout(num_layers=1, num_blocks=nb, block_size=bs, num_kv_heads=per, head_dim=d, dtype=dtype,
                     order=order, kv_fused=fused, head_start=r * per, total_kv_heads=total) for r in range(tp)]


def _random(shape, dtype, device, gen: torch.Generator | None = None) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if gen is None:
        t.view(torch.uint8).random_(0, 256)
    else:
        t.view(torch.uint8).copy_(torch.randint(0, 256, t.view(torch.uint8).shape, dtype=torch.uint8,
                                                generator=gen).to(device))
    return t


def _layer(lay: KVLayout, device, gen=None):
    one = functools.partial(_random, lay.tensor_shape(), lay.dtype, device, gen)
    return one() if lay.fused else (one(), one())


def _planes(layer) -> tuple[torch.Tensor, ...]:
    return (layer,) if isinstance(layer, torch.Tensor) else tuple(layer)


def _same(a, b) -> bool:
    return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(_planes(a), _planes(b),
                                                                                      strict=True))


def _guarded_buffer(nbytes: int, device, offset: int = 0, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(whole, view): ``view`` is ``nbytes`` at ``offset`` inside ``whole``; everything else holds GUARD."""
    whole = torch.full((offset + nbytes + GUARD_BYTES,), GUARD, dtype=torch.uint8, device=device)
    if pin:
        whole = whole.pin_memory()
    return whole, whole[offset: offset + nbytes]


def _guards_intact(whole: torch.Tensor, offset: int, nbytes: int) -> bool:
    return bool((whole[:offset] == GUARD).all()) and bool((whole[offset + nbytes:] == GUARD).all())


def _word(lay: KVLayout, layer, chunk: torch.Tensor) -> int:
    return triton_kernels.word_size(cuda_path.layer_view(lay, layer), chunk.data_ptr())


def exact(device: str = "cuda", tokens: int = 300) -> dict:
    """Pack and unpack (Triton on CUDA; through the interpreter on CPU) vs the reference, every case."""
    gen = torch.Generator().manual_seed(0)
    failures: list[str] = []
    words: set[int] = set()
    for name, order, fused, dtype, bs_s, bs_d, total, tp_s, tp_d, d in CASES:
        start, end = 7, tokens - 3
        nb_s, nb_d = -(-tokens // bs_s) + 3, -(-tokens // bs_d) + 3
        ids_s = torch.randperm(nb_s, generator=gen)[: -(-tokens // bs_s)].tolist()
        ids_d = torch.randperm(nb_d, generator=gen)[: -(-tokens // bs_d)].tolist()
        chunks = []
        for rank, lay in enumerate(_layouts(order, fused, dtype, bs_s, total, tp_s, d, nb_s)):
            layer = _layer(lay, device, gen)
            n = lay.chunk_nbytes(end - start)
            offset = 0 if rank == 0 else 3  # rank 1+ packs at an odd address: byte words on the chunk side
            whole, out = _guarded_buffer(n, device, offset)
            words.add(_word(lay, layer, out))
            pack(lay, layer, ids_s, start, end, out, impl="triton")
            ref = torch.zeros(n, dtype=torch.uint8, device=device)
            pack(lay, layer, ids_s, start, end, ref, impl="torch")
            if not torch.equal(out, ref) or not _guards_intact(whole, offset, n):
                failures.append(f"pack {name} rank {rank}")
            chunks.append((lay.head_start, lay.head_end, ref))
        for rank, lay in enumerate(_layouts(order, fused, dtype, bs_d, total, tp_d, d, nb_d)):
            got = _layer(lay, device, gen)
            want = tuple(p.clone() for p in _planes(got))
            for h0, h1, chunk in chunks:
                if h0 < lay.head_end and h1 > lay.head_start:
                    unpack(lay, got, ids_d, start, end, chunk, h0, h1, impl="triton")
                    unpack(lay, want if len(want) == 2 else want[0], ids_d, start, end, chunk, h0, h1, impl="torch")
            if not _same(got, want):
                failures.append(f"unpack {name} rank {rank}")
    ok = not failures and words == {1, 2, 4, 8}
    return {"ok": ok, "cases": len(CASES), "failures": failures, "word_widths": sorted(words)}


def large(device: str = "cuda") -> dict:
    """Layers over 2**31 elements (bf16, 8-byte words) and over 2**31 bytes (fp8 rows of 33: 1-byte words),
    the copied blocks at the far end of the cache."""
    out: dict[str, Any] = {"ok": True}
    for name, dtype, d in (("bf16x128", torch.bfloat16, 128), ("fp8x33", torch.float8_e4m3fn, 33)):
        per_block = 2 * 16 * 8 * d
        nb = (2**31 // per_block) + 64
        lay = KVLayout(num_layers=1, num_blocks=nb, block_size=16, num_kv_heads=8, head_dim=d, dtype=dtype)
        layer = _layer(lay, device)
        ids = torch.randperm(48).add_(nb - 48).tolist()
        n = lay.chunk_nbytes(700)
        whole, buf = _guarded_buffer(n, device)
        pack(lay, layer, ids, 5, 705, buf)
        ref = torch.zeros(n, dtype=torch.uint8, device=device)
        pack(lay, layer, ids, 5, 705, ref, impl="torch")
        ok_pack = torch.equal(buf, ref) and _guards_intact(whole, 0, n)
        chunk = _random((n,), torch.uint8, device)
        tail = layer[:, nb - 48:].clone()
        unpack(lay, layer, ids, 5, 705, chunk, 0, 8)
        want = layer.clone()
        want[:, nb - 48:] = tail
        unpack(lay, want, ids, 5, 705, chunk, 0, 8, impl="torch")
        ok_unpack = torch.equal(layer.view(torch.uint8), want.view(torch.uint8))
        out[name] = {"elements": layer.numel(), "bytes": layer.numel() * layer.element_size(), "pack": ok_pack,
                     "unpack": ok_unpack}
        out["ok"] = out["ok"] and ok_pack and ok_unpack
        del layer, want, whole, buf, ref, chunk, tail
        torch.cuda.empty_cache()
    return out


def _llama(tokens: int, device) -> tuple[KVLayout, torch.Tensor, list[int]]:
    need = -(-tokens // 16)
    lay = KVLayout(num_layers=1, num_blocks=need + need // 4 + 1, block_size=16, num_kv_heads=8, head_dim=128,
                   dtype=torch.bfloat16)
    ids = torch.randperm(lay.num_blocks)[:need].tolist()
    return lay, _layer(lay, device), ids


def _ref_pack(lay, layer, ids, start, end) -> torch.Tensor:
    ref = torch.zeros(lay.chunk_nbytes(end - start), dtype=torch.uint8, device=_planes(layer)[0].device)
    pack(lay, layer, ids, start, end, ref, impl="torch")
    return ref


def streams(device: str = "cuda") -> dict:
    """Ordering on a side stream (done= event), the current stream of the cache's device, a non-current
    device when there are two, no host wait per call, and no recompiles across token ranges."""
    out: dict[str, Any] = {}
    lay, layer, ids = _llama(4096, device)
    fresh = _random(layer.shape, layer.dtype, device)
    buf = torch.empty(lay.chunk_nbytes(4000), dtype=torch.uint8, device=device)
    pack(lay, layer, ids, 10, 4010, buf)  # compiles, and uploads the ids: the timings below are per call
    torch.cuda.synchronize()
    # (1) a side stream: the cache is rewritten there after a spin; pack on that stream must see the new bytes
    side = torch.cuda.Stream()
    done = torch.cuda.Event()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SPIN)
        layer.copy_(fresh)
    t0 = time.perf_counter()
    pack(lay, layer, ids, 10, 4010, buf, stream=side, done=done)
    out["pack_return_ms_behind_spin"] = round((time.perf_counter() - t0) * 1e3, 3)
    torch.cuda.current_stream().wait_event(done)
    out["side_stream"] = bool(torch.equal(buf, _ref_pack(lay, fresh, ids, 10, 4010)))
    torch.cuda.synchronize()
    # (2) the default: the current stream of the cache's device, after work queued there
    torch.cuda._sleep(SPIN)
    layer.copy_(fresh.flip(0))
    pack(lay, layer, ids, 10, 4010, buf)
    out["current_stream"] = bool(torch.equal(buf, _ref_pack(lay, fresh.flip(0), ids, 10, 4010)))
    # (3) a cache on cuda:1 while cuda:0 is current; cuda:1's current stream is a side stream, where the cache
    # is rewritten after a spin: the pack must run there (not on cuda:0, not on cuda:1's default stream)
    if torch.cuda.device_count() >= 2:
        lay1, layer1, ids1 = _llama(1024, "cuda:1")
        fresh1 = _random(layer1.shape, layer1.dtype, "cuda:1")
        buf1 = torch.empty(lay1.chunk_nbytes(1000), dtype=torch.uint8, device="cuda:1")
        s1 = torch.cuda.Stream("cuda:1")
        prev = torch.cuda.current_device()
        with torch.cuda.stream(s1):  # s1 becomes cuda:1's current stream (and cuda:1 the current device)
            torch.cuda._sleep(SPIN)
            layer1.copy_(fresh1)
            torch.cuda.set_device(0)  # cuda:0 current again; cuda:1's current stream stays s1
            pack(lay1, layer1, ids1, 3, 1003, buf1)
            out["current_device_at_pack"] = torch.cuda.current_device()
        torch.cuda.set_device(prev)
        s1.synchronize()
        out["non_current_device"] = bool(torch.equal(buf1, _ref_pack(lay1, fresh1, ids1, 3, 1003)))
    else:
        out["non_current_device"] = "skipped: one device"
    # (4) no recompiles: new token ranges and head slices after a warm-up reuse the compiled binaries
    dev = torch.device(device)
    warm = lay.chunk_nbytes(4096)
    chunk = torch.empty(warm, dtype=torch.uint8, device=device)
    pack(lay, layer, ids, 0, 64, chunk)
    unpack(lay, layer, ids, 0, 64, chunk[: lay.chunk_nbytes(64)], 0, 8)
    torch.cuda.synchronize()
    caches = triton_kernels.kv_copy_jit.device_caches
    before = len(caches[dev.index or 0][0])
    slowest = 0.0
    gen = torch.Generator().manual_seed(1)
    for _ in range(40):
        s = int(torch.randint(0, 2000, (1,), generator=gen))
        e = s + int(torch.randint(1, 2000, (1,), generator=gen))
        h0 = int(torch.randint(0, 8, (1,), generator=gen))
        t0 = time.perf_counter()
        pack(lay, layer, ids, s, e, chunk, h0, 8)
        unpack(lay, layer, ids, s, e, chunk[: lay.chunk_nbytes(e - s, 8 - h0)], h0, 8)
        slowest = max(slowest, time.perf_counter() - t0)
    torch.cuda.synchronize()
    out["compiled_before"], out["compiled_after"] = before, len(caches[dev.index or 0][0])
    out["slowest_call_ms"] = round(slowest * 1e3, 3)
    out["ok"] = (out["side_stream"] and out["current_stream"] and out["non_current_device"] is not False
                 and out["compiled_after"] == before and out["pack_return_ms_behind_spin"] < 50)
    return out


def staging(device: str = "cuda") -> dict:
    """A CUDA cache packed into host memory (pinned and pageable) and unpacked from it: pack returns with
    the bytes there, unpack with the chunk free for reuse; with done= the caller waits."""
    out: dict[str, Any] = {}
    lay, layer, ids = _llama(2048, device)
    n = lay.chunk_nbytes(2000)
    for pin in (True, False):
        kind = "pinned" if pin else "pageable"
        fresh = _random(layer.shape, layer.dtype, device)
        torch.cuda._sleep(SPIN)
        layer.copy_(fresh)
        whole, host = _guarded_buffer(n, "cpu", offset=5, pin=pin)
        pack(lay, layer, ids, 20, 2020, host)  # no sync by the caller
        ref = _ref_pack(lay, fresh, ids, 20, 2020).cpu()
        out[f"pack_{kind}"] = bool(torch.equal(host, ref)) and _guards_intact(whole, 5, n)
        done = torch.cuda.Event()
        torch.cuda._sleep(SPIN)
        host.zero_()
        pack(lay, layer, ids, 20, 2020, host, done=done)
        done.synchronize()
        out[f"pack_{kind}_done"] = bool(torch.equal(host, ref))
        src = _random((n,), torch.uint8, "cpu")
        chunk = src.pin_memory() if pin else src.clone()
        want = layer.clone()
        unpack(lay, want, ids, 20, 2020, src, 0, 8, impl="torch")
        torch.cuda._sleep(SPIN)
        unpack(lay, layer, ids, 20, 2020, chunk, 0, 8)
        chunk.fill_(0)  # reused at once: the contract says it was already copied
        torch.cuda.synchronize()
        out[f"unpack_{kind}"] = bool(torch.equal(layer.view(torch.uint8), want.view(torch.uint8)))
    out["ok"] = all(v for v in out.values())
    return out


def _event_time(fn: Callable[[], Any], repeat: int) -> float:
    """Median seconds per call, by CUDA events around each call."""
    fn()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def bandwidth(device: str = "cuda", quick: bool = False, min_fraction: float = 0.5) -> dict:
    """Llama-3-8B-like layer: pack/unpack traffic (read + write) vs a device copy of the same bytes and the
    device's peak; passes when both reach ``min_fraction`` of peak at the largest size.  Also the host
    time per small call (launch included), the figure layer-wise transfer lives on."""
    from kvrelay.kernels.device import device_peak_gbps
    peak, source = device_peak_gbps(torch.device(device).index or 0)
    sizes = [2048, 32768] if quick else [2048, 8192, 32768, 131072]
    rows = []
    for tokens in sizes:
        lay, layer, id_list = _llama(tokens, device)
        ids = np.asarray(id_list, dtype=np.int64)  # as engines hold them; a long Python list costs host time
        chunk = torch.empty(lay.chunk_nbytes(tokens), dtype=torch.uint8, device=device)
        other = torch.empty_like(chunk)
        repeat = 10 if quick else 30
        secs = {"copy_": _event_time(functools.partial(other.copy_, chunk), repeat),
                "pack": _event_time(functools.partial(pack, lay, layer, ids, 0, tokens, chunk), repeat),
                "unpack": _event_time(functools.partial(unpack, lay, layer, ids, 0, tokens, chunk, 0, 8), repeat)}
        row: dict[str, Any] = {"tokens": tokens, "mib": round(chunk.numel() / 2**20, 1)}
        for k, s in secs.items():
            row[f"{k}_gbps"] = round(2 * chunk.numel() / s / 1e9, 1)
            row[f"{k}_of_peak"] = round(2 * chunk.numel() / s / 1e9 / peak, 3)
        rows.append(row)
        del layer, chunk, other
    lay_s, layer_s, ids_s = _llama(256, device)
    small = torch.empty(lay_s.chunk_nbytes(16), dtype=torch.uint8, device=device)
    pack(lay_s, layer_s, ids_s, 0, 16, small)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(200):
        pack(lay_s, layer_s, ids_s, 16 * (i % 15), 16 * (i % 15) + 16, small)
    host_us = (time.perf_counter() - t0) / 200 * 1e6
    torch.cuda.synchronize()
    last = rows[-1]
    ok = last["pack_of_peak"] >= min_fraction and last["unpack_of_peak"] >= min_fraction
    return {"ok": ok, "peak_gbps": round(peak), "peak_source": source, "threshold_of_peak": min_fraction,
            "rows": rows, "host_us_per_small_pack": round(host_us, 1)}


PARTS: dict[str, Callable[..., dict]] = {  # the kernel parts, in the order kvrelay/diagnostics/gpu_check.py runs them
    "exact": exact, "large": large, "streams": streams, "staging": staging, "bandwidth": bandwidth,
}
