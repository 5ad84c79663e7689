"""Fixtures: a real `kvrelay store` daemon process on free ports with a tmp SSD dir, killed in teardown."""

from __future__ import annotations


import pytest

from store_helpers import Daemon


@pytest.fixture
def daemon_factory(tmp_path):
    made: list[Daemon] = []

    def make(**opts) -> Daemon:
        d = Daemon(tmp_path, **opts)
        made.append(d)
        return d.start()

    yield make
    for d in made:
        d.cleanup()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """One daemon shared by a module's tests (they use distinct keys); fresh ones via daemon_factory."""
    d = Daemon(tmp_path_factory.mktemp("store"), pool_size="64MiB", max_chunk_bytes="8MiB")
    try:
        yield d.start()
    finally:
        d.cleanup()
