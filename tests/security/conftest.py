"""Fixtures for the security tests: key directories (the cluster's, and an intruder's), the store helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvrelay import security


@pytest.fixture(scope="session")
def keys_dir(tmp_path_factory) -> Path:
    return security.write_keys(tmp_path_factory.mktemp("keys") / "cluster")


@pytest.fixture(scope="session")
def keys(keys_dir) -> security.Keys:
    return security.load(keys_dir)


@pytest.fixture(scope="session")
def other_keys(tmp_path_factory) -> security.Keys:
    """Another cluster's keys: the wrong key everywhere."""
    return security.load(security.write_keys(tmp_path_factory.mktemp("keys") / "other"))


@pytest.fixture(autouse=True)
def no_ambient_keys(monkeypatch):
    """No test inherits keys from the environment; each says which it uses (security.using)."""
    monkeypatch.delenv(security.ENV, raising=False)
    with security.using(None):
        yield
