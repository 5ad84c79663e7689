"""Settings for the whole test session."""

import os

# UCX (under NIXL) warns at interpreter exit about request objects of transfers whose peer a test
# killed on purpose; kvrelay's own handles are counted by the tests.  Keep the test log readable.
os.environ.setdefault("UCX_LOG_LEVEL", "error")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_keys_leak():
    """A test that configures keys in this process (a command's ``main`` calls `security.configure`, which
    also exports $KVRELAY_KEYS for children) must not turn authentication on for every later test."""
    from kvrelay.security import config
    env = os.environ.get(config.ENV)
    yield
    if os.environ.get(config.ENV) != env:
        if env is None:
            os.environ.pop(config.ENV, None)
        else:
            os.environ[config.ENV] = env
    with config._lock:
        config._current, config._loaded_from = None, None
