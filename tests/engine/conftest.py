"""Fixtures for the reference engine tests: the default model's weights (built once) and a real
`kvrelay store` daemon process (shm, tcp and nixl endpoints) killed in teardown."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import StoreProc
from kvrelay.engines.reference.config import ModelConfig
from kvrelay.engines.reference.weights import random_weights


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on 2 shared cores OpenMP's spinning threads run 2-3x slower than one thread
    (engines spawned by these tests get --threads 1 too).  Restored after each module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model_cfg() -> ModelConfig:
    return ModelConfig()


@pytest.fixture(scope="session")
def weights(model_cfg):
    return random_weights(model_cfg)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = StoreProc(tmp_path_factory.mktemp("store"))
    try:
        yield s
    finally:
        s.close()
