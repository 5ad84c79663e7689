"""Fixtures of the vLLM tests: the seeded checkpoint (written once per session) and a plain vLLM server
(one per module: each takes about a minute and 3 GB to start here)."""

from __future__ import annotations

import pytest

from vllm_helpers import require_vllm


@pytest.fixture(scope="session")
def llama_ckpt(tmp_path_factory):
    """The small seeded Llama checkpoint (bfloat16, 1,024-token vocabulary, no tokenizer)."""
    from kvrelay.engines.vllm.checkpoint import write_llama_checkpoint
    return write_llama_checkpoint(tmp_path_factory.mktemp("llama") / "kvrelay-llama")


@pytest.fixture(scope="module")
def plain_server(llama_ckpt, tmp_path_factory):
    """One vLLM server with no KV connector, stopped (its whole process group) after the module."""
    require_vllm()
    from kvrelay.engines.vllm.process import VllmServer
    log = tmp_path_factory.mktemp("vllm-logs") / "plain.log"
    with VllmServer(llama_ckpt, name="kvrelay-llama", cpu_core=0, log_path=log).start(timeout=420) as server:
        yield server
