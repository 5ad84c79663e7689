"""Fixtures of the membership tests: a real etcd per test (etcd_helpers.py)."""

from __future__ import annotations

import pytest

from etcd_helpers import EtcdProcess


@pytest.fixture
def etcd(tmp_path):
    server = EtcdProcess(tmp_path).start()
    try:
        yield server
    finally:
        server.kill()
