"""The native worker pool: thread counts, concurrent callers, fork safety, GIL release.

Each case counts on a hang being caught by the timeout and on byte-exact results against a
single-threaded run.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time

import numpy as np
import pytest
import torch

from kernels_util import allocate
from waiting import wait_until
from kvrelay.kernels import KVLayout, get_num_threads, native, pack, set_num_threads, unpack


@pytest.fixture
def llama():
    gen = torch.Generator().manual_seed(3)
    layout = KVLayout(num_layers=1, num_blocks=80, block_size=16, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    layer = allocate(layout, gen)
    ids = np.random.default_rng(3).permutation(80)[:64]
    ref = torch.empty(layout.chunk_nbytes(1000), dtype=torch.uint8)
    pack(layout, layer, ids, 7, 1007, ref, impl="torch")
    native.set_parallel_threshold(0)  # every copy goes through the pool
    native.set_backoff(0)  # ... even when a lagging worker would make it back off
    yield layout, layer, ids, ref
    native.set_parallel_threshold(1 << 20)
    native.set_backoff(0.05)
    set_num_threads(2)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_thread_counts(llama, n):
    layout, layer, ids, ref = llama
    set_num_threads(n)
    assert get_num_threads() == n
    for _ in range(20):
        out = torch.zeros_like(ref)
        pack(layout, layer, ids, 7, 1007, out)
        assert torch.equal(out, ref)
    back = torch.zeros_like(layer)
    unpack(layout, back, ids, 7, 1007, ref, 0, 8)
    again = torch.zeros_like(ref)
    pack(layout, back, ids, 7, 1007, again, impl="torch")
    assert torch.equal(again, ref)


def test_bad_thread_count():
    with pytest.raises(ValueError, match=r"thread count must be in \[1, 256\], got 0"):
        set_num_threads(0)


@pytest.mark.timeout(60)
def test_concurrent_callers(llama):
    """Several Python threads packing at once: the pool serves one, the others run inline; all exact."""
    layout, layer, ids, ref = llama
    errors: list[str] = []

    def work() -> None:
        out = torch.empty_like(ref)
        for _ in range(30):
            out.zero_()
            pack(layout, layer, ids, 7, 1007, out)
            if not torch.equal(out, ref):
                errors.append("mismatch")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=50)
    assert not any(t.is_alive() for t in threads), "a packing thread hung"
    assert errors == []


def _child_pack(layout, layer, ids, q) -> None:
    out = torch.empty(layout.chunk_nbytes(1000), dtype=torch.uint8)
    native.set_parallel_threshold(0)
    native.set_backoff(0)
    pack(layout, layer, ids, 7, 1007, out)
    q.put(out.numpy().tobytes())


@pytest.mark.timeout(60)
def test_fork_after_pool_use(llama):
    """A forked child (multiprocessing 'fork') must restart the pool instead of waiting on dead workers."""
    layout, layer, ids, ref = llama
    pack(layout, layer, ids, 7, 1007, torch.empty_like(ref))  # the pool is running now
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_pack, args=(layout, layer, ids, q))
    p.start()
    try:
        data = q.get(timeout=40)
    finally:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join()
    assert data == ref.numpy().tobytes()
    assert p.exitcode == 0


@pytest.mark.timeout(60)
def test_gil_released_during_copy():
    """Another Python thread keeps running while a large pack is in flight."""
    layout = KVLayout(num_layers=1, num_blocks=4096, block_size=16, num_kv_heads=8, head_dim=128,
                      dtype=torch.bfloat16)
    layer = torch.zeros(layout.tensor_shape(), dtype=layout.dtype)  # 256 MiB
    ids = np.arange(4096)
    out = torch.empty(layout.chunk_nbytes(4096 * 16), dtype=torch.uint8)
    ticks = []
    stop = threading.Event()

    def ticker() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.0005)

    t = threading.Thread(target=ticker)
    t.start()
    try:
        wait_until(lambda: len(ticks) >= 2, 10, "the ticker thread ticking")
        t0 = time.perf_counter()
        pack(layout, layer, ids, 0, 4096 * 16, out)
        pack(layout, layer, ids, 0, 4096 * 16, out)
        t1 = time.perf_counter()
    finally:
        stop.set()
        t.join(timeout=5)
    inside = [x for x in ticks if t0 < x < t1]
    # With the GIL held for the whole copy the ticker could not run at all between t0 and t1.
    assert len(inside) >= 10, f"ticker ran {len(inside)} times during {t1 - t0:.3f}s of copying"


@pytest.mark.timeout(60)
def test_exact_when_the_pool_is_starved(llama):
    """Workers starved of CPU (caller, 2 workers and 2 spinning threads on one core), with back-off on:
    workers join late or lag, the caller may back off to copying alone; results stay exact."""
    layout, layer, ids, ref = llama
    native.set_backoff(0.05)
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    import os
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(old)})  # this thread, the pool's workers (inherit on restart) and spinners
    set_num_threads(3)  # restart the pool so its workers inherit the one-core affinity
    spinners = [threading.Thread(target=spin) for _ in range(2)]
    for t in spinners:
        t.start()
    try:
        for _ in range(30):
            out = torch.zeros_like(ref)
            pack(layout, layer, ids, 7, 1007, out)
            assert torch.equal(out, ref)
    finally:
        stop.set()
        for t in spinners:
            t.join(timeout=5)
        os.sched_setaffinity(0, old)
    assert native.backoffs() >= 0


def _allowed(tid: int) -> set[int]:
    return os.sched_getaffinity(tid)


@pytest.mark.timeout(60)
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_worker_moves_off_its_callers_core():
    """A worker that runs on its caller's core (Linux puts a woken thread there when the other cores idle)
    narrows its affinity to the other cores, so the two do not take turns on one core; the bytes stay exact."""
    from kvrelay.transfer.wire import checksum, copy_into
    native.set_parallel_threshold(0)
    native.set_backoff(0)
    set_num_threads(1)  # stops a running pool: the next copy starts fresh workers, whose ids we want
    set_num_threads(2)
    me = threading.get_native_id()
    full = os.sched_getaffinity(0)
    cpu = min(full)
    src = torch.randint(0, 256, (64 << 20,), dtype=torch.uint8)  # longer than a scheduler tick on one core
    dst = torch.empty_like(src)
    try:
        before = set(os.listdir("/proc/self/task"))
        copy_into(dst, src, False)  # starts the pool
        workers = [int(t) for t in set(os.listdir("/proc/self/task")) - before]
        assert workers, "the native pool started no worker thread"
        want = checksum(src)
        os.sched_setaffinity(me, {cpu})
        for w in workers:
            os.sched_setaffinity(w, {cpu})  # as if woken onto the caller's core
        moved = False
        for _ in range(100):
            assert copy_into(dst, src, True) == want
            if all(_allowed(w) == full - {cpu} for w in workers):
                moved = True
                break
            time.sleep(0.005)
        assert moved, f"the worker stayed on its caller's core {cpu}: allowed {[_allowed(w) for w in workers]}"
        assert torch.equal(dst, src)
    finally:
        os.sched_setaffinity(me, full)
        native.set_parallel_threshold(1 << 20)
        native.set_backoff(0.05)
