"""KVRelayConnector's settings: every bad or missing value is refused at start-up with a message that names
it (no vLLM server needed: RelayConfig is what the connector parses)."""

from __future__ import annotations

import pytest

from kvrelay.engines.vllm.config import ConfigError, RelayConfig

GOOD = {"store": "tcp://127.0.0.1:5600"}


def _parse(extra=None, role="kv_both", policy="recompute", block=32):
    return RelayConfig.parse(role, GOOD if extra is None else extra, policy, "/models/m", block)


def test_defaults_and_roles():
    cfg = _parse()
    assert (cfg.store, cfg.transport, cfg.chunk_tokens, cfg.failure_policy, cfg.model_id) == \
        ("tcp://127.0.0.1:5600", "shm", 256, "recompute", "/models/m")
    assert cfg.publishes and cfg.loads
    assert _parse(role="kv_producer").publishes and not _parse(role="kv_producer").loads
    assert _parse(role="kv_consumer").loads and not _parse(role="kv_consumer").publishes


@pytest.mark.parametrize("extra, role, policy, words", [
    ({}, "kv_both", "recompute", "store"),
    ({"store": "127.0.0.1:5600"}, "kv_both", "recompute", "store"),
    ({**GOOD, "transport": "carrier-pigeon"}, "kv_both", "recompute", "transport"),
    ({**GOOD, "chunk_tokens": 100}, "kv_both", "recompute", "chunk_tokens"),
    ({**GOOD, "chunk_tokens": "256"}, "kv_both", "recompute", "chunk_tokens"),
    ({**GOOD, "failure_policy": "retry"}, "kv_both", "recompute", "failure_policy"),
    ({**GOOD, "failure_policy": "recompute"}, "kv_both", "fail", "kv_load_failure_policy"),
    ({**GOOD, "pull_timeout_s": 0}, "kv_both", "recompute", "pull_timeout_s"),
    ({**GOOD, "pull_timeout_s": True}, "kv_both", "recompute", "pull_timeout_s"),
    ({**GOOD, "prefix_lookup": "yes"}, "kv_both", "recompute", "prefix_lookup"),
    ({**GOOD, "model_id": ""}, "kv_both", "recompute", "model_id"),
    ({**GOOD, "sotre": "x"}, "kv_both", "recompute", "sotre"),
    ({**GOOD, "head_slices": "2"}, "kv_both", "recompute", "head_slices"),
    ({**GOOD, "head_slices": -1}, "kv_both", "recompute", "head_slices"),
    ({**GOOD, "head_slices": True}, "kv_both", "recompute", "head_slices"),
    (GOOD, "kv_sideways", "recompute", "kv_role"),
])
def test_bad_values_are_refused_naming_them(extra, role, policy, words):
    with pytest.raises(ConfigError, match=words):
        _parse(extra, role=role, policy=policy)
