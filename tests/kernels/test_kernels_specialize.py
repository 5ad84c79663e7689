"""What Triton compiles, checked without a GPU: per-request integers share one binary (no recompiles in
live traffic), the CUDA path is a real JITFunction whatever TRITON_INTERPRET says, and an sm_90 build of
the Llama and MLA tiles uses 16-byte vectors and few registers (ptxas from Triton's wheel)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import triton
from triton.runtime.jit import JITFunction

from kvrelay.kernels import KVLayout, cuda_path, triton_kernels
from kvrelay.kernels.plan import plan_pack, plan_unpack

LLAMA = KVLayout(num_layers=1, num_blocks=300, block_size=16, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)
MLA = KVLayout(num_layers=1, num_blocks=80, block_size=64, num_kv_heads=1, head_dim=576, dtype=torch.bfloat16,
               order="MLA")


def _launch(lay: KVLayout, start: int, end: int, heads: tuple[int, int] | None = None, pack: bool = True,
            rank_heads: tuple[int, int] | None = None):
    if rank_heads is not None:
        lay = KVLayout(num_layers=1, num_blocks=lay.num_blocks, block_size=lay.block_size,
                       num_kv_heads=rank_heads[1] - rank_heads[0], head_dim=lay.head_dim, dtype=lay.dtype,
                       head_start=rank_heads[0], total_kv_heads=8)
    layer = torch.empty(lay.tensor_shape(), dtype=lay.dtype)
    ids = list(range(-(-end // lay.block_size)))
    if pack:
        plan = plan_pack(lay, ids, start, end, *(heads or (None, None)))
    else:
        plan = plan_unpack(lay, ids, start, end, *(heads or (0, lay.total_kv_heads)))
    chunk = torch.empty(plan.nbytes + 64, dtype=torch.uint8)
    return triton_kernels.prepare(cuda_path.layer_view(lay, layer), plan, chunk, torch.from_numpy(plan.ids), pack)


def test_per_request_ints_are_not_specialised():
    names = [p.name for p in triton_kernels.kv_copy_jit.params]
    assert set(triton_kernels.DO_NOT_SPECIALIZE) <= set(names)
    flags = {p.name: p.do_not_specialize for p in triton_kernels.kv_copy_jit.params}
    assert all(flags[n] for n in triton_kernels.DO_NOT_SPECIALIZE)
    assert isinstance(triton_kernels.kv_copy_jit, JITFunction)


@pytest.mark.timeout(120)
def test_token_ranges_and_head_slices_share_one_compiled_key():
    from kvrelay.kernels.compile_check import specialization_key
    align = 1 << 12  # the same (aligned) chunk address for all: alignment is a separate, documented variant
    keys = {specialization_key(_launch(LLAMA, s, e), True, chunk_address=align)
            for s, e in [(0, 2048), (7, 300), (16, 320), (0, 1), (1000, 1017), (33, 4095)]}
    assert len(keys) == 1, keys
    unpack_keys = {specialization_key(_launch(LLAMA, 5, 300, heads=h, pack=False, rank_heads=r), False,
                                      chunk_address=align)
                   for h, r in [((0, 8), (0, 4)), ((0, 8), (4, 8)), ((2, 6), (4, 8)), ((4, 8), (4, 8))]}
    assert len(unpack_keys) == 1, unpack_keys
    # negative controls: a new layout compiles anew, and so does the same kernel without do_not_specialize
    assert specialization_key(_launch(MLA, 0, 2048), True, chunk_address=align) not in keys
    plain = JITFunction(triton_kernels._kv_copy)
    real = triton_kernels.kv_copy_jit
    try:
        triton_kernels.kv_copy_jit = plain
        plain_keys = {specialization_key(_launch(LLAMA, s, e), True, chunk_address=align)
                      for s, e in [(0, 2048), (7, 300)]}
    finally:
        triton_kernels.kv_copy_jit = real
    assert len(plain_keys) == 2


def test_triton_interpret_in_the_environment_does_not_reach_the_cuda_path():
    code = ("import os, triton; from triton.runtime.jit import JITFunction; "
            "from kvrelay.kernels import triton_kernels as t; "
            "assert os.environ['TRITON_INTERPRET'] == '1' and triton.knobs.runtime.interpret; "
            "print(type(t.kv_copy_jit).__name__, isinstance(t.kv_copy_jit, JITFunction))")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["JITFunction", "True"]


def test_no_test_module_sets_triton_interpret_at_import():
    """Set at import, it leaks into every later test of a GPU run and into their subprocesses."""
    root = os.path.dirname(os.path.dirname(__file__))
    offenders = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py") and f != os.path.basename(__file__):
                with open(os.path.join(dirpath, f)) as fh:
                    text = fh.read()
                if 'environ.setdefault("TRITON_INTERPRET"' in text or 'environ["TRITON_INTERPRET"] =' in text:
                    offenders.append(os.path.relpath(os.path.join(dirpath, f), root))
    assert offenders == []


def _ptxas_available() -> bool:
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return all(os.path.exists(os.path.join(bin_dir, tool)) for tool in ("ptxas", "cuobjdump"))


@pytest.mark.timeout(300)
@pytest.mark.skipif(not _ptxas_available(), reason="this triton wheel ships no ptxas/cuobjdump for an offline sm_90 build")
@pytest.mark.parametrize("pack", [True, False], ids=["pack", "unpack"])
def test_sm90_build_uses_16_byte_vectors_and_few_registers(pack):
    from kvrelay.kernels.compile_check import compile_for
    for lay in (LLAMA, MLA):
        launch = _launch(lay, 7, 300, pack=pack)
        build = compile_for(launch, pack)
        assert launch.word == 8 and launch.block_w == (32 if lay is LLAMA else 16)  # MLA: 144 words = 9 x 16
        assert {"ld.global.v2.b64", "st.global.v2.b64"} <= set(build.loads), build
        assert build.registers <= 64, build  # the old 16x256 int64 tile took 116-128 here
