"""The Triton kernels on a real GPU: the stream contract (a side stream with ``done=``, host staging) and no
recompiles across token ranges.  Skipped without CUDA; the GPU check (python -m kvrelay.diagnostics.gpu_check)
runs this file.  NOTE: written without access to a GPU; the same logic is tested on CPU with a fake
runtime in tests/kernels/test_kernels_streams.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvrelay.kernels import KVLayout, pack, triton_kernels, unpack

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.timeout(120)]

SPIN = 200_000_000  # cycles of torch.cuda._sleep: queued work that a wrong order would overtake


def _setup(tokens: int = 2048):
    need = tokens // 16
    lay = KVLayout(num_layers=1, num_blocks=need + 8, block_size=16, num_kv_heads=8, head_dim=128,
                   dtype=torch.bfloat16)
    layer = torch.empty(lay.tensor_shape(), dtype=lay.dtype, device="cuda")
    layer.view(torch.uint8).random_(0, 256)
    ids = np.random.default_rng(0).permutation(lay.num_blocks)[:need]
    return lay, layer, ids


def _ref(lay, layer, ids, start, end):
    ref = torch.zeros(lay.chunk_nbytes(end - start), dtype=torch.uint8, device="cuda")
    pack(lay, layer, ids, start, end, ref, impl="torch")
    return ref


def test_side_stream_with_done_sees_work_queued_there_first():
    lay, layer, ids = _setup()
    fresh = torch.empty_like(layer)
    fresh.view(torch.uint8).random_(0, 256)
    out = torch.empty(lay.chunk_nbytes(2000), dtype=torch.uint8, device="cuda")
    pack(lay, layer, ids, 5, 2005, out)  # warm: compile and upload the ids
    torch.cuda.synchronize()
    side, done = torch.cuda.Stream(), torch.cuda.Event()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SPIN)
        layer.copy_(fresh)
    pack(lay, layer, ids, 5, 2005, out, stream=side, done=done)
    assert not done.query()  # returned while the side stream still spins: no host wait
    torch.cuda.current_stream().wait_event(done)
    assert torch.equal(out, _ref(lay, fresh, ids, 5, 2005))


@pytest.mark.parametrize("pin", [True, False], ids=["pinned", "pageable"])
def test_host_buffers_are_ready_on_return(pin):
    lay, layer, ids = _setup()
    n = lay.chunk_nbytes(2000)
    host = torch.full((n + 64,), 0xA5, dtype=torch.uint8)
    host = host.pin_memory() if pin else host
    torch.cuda._sleep(SPIN)
    pack(lay, layer, ids, 5, 2005, host[:n])
    assert torch.equal(host[:n], _ref(lay, layer, ids, 5, 2005).cpu())
    assert bool((host[n:] == 0xA5).all())
    want = layer.clone()
    unpack(lay, want, ids, 5, 2005, host[:n].flip(0).clone(), 0, 8, impl="torch")
    chunk = host[:n].flip(0).clone()
    chunk = chunk.pin_memory() if pin else chunk
    torch.cuda._sleep(SPIN)
    unpack(lay, layer, ids, 5, 2005, chunk, 0, 8)
    chunk.zero_()  # reusable on return
    torch.cuda.synchronize()
    assert torch.equal(layer.view(torch.uint8), want.view(torch.uint8))


def test_new_token_ranges_do_not_compile_again():
    lay, layer, ids = _setup(4096)
    chunk = torch.empty(lay.chunk_nbytes(4096), dtype=torch.uint8, device="cuda")
    pack(lay, layer, ids, 0, 16, chunk)
    unpack(lay, layer, ids, 0, 16, chunk, 0, 8)
    torch.cuda.synchronize()
    cache = triton_kernels.kv_copy_jit.device_caches[torch.cuda.current_device()][0]
    before = len(cache)
    for start, end, h0 in [(7, 300, 0), (16, 320, 2), (1000, 1001, 7), (33, 4095, 4), (0, 4096, 0)]:
        pack(lay, layer, ids, start, end, chunk, h0, 8)
        unpack(lay, layer, ids, start, end, chunk[: lay.chunk_nbytes(end - start, 8 - h0)], h0, 8)
    torch.cuda.synchronize()
    assert len(cache) == before
