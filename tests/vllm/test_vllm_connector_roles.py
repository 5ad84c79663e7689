"""KVRelayConnector's roles (issue 21): a hook that reaches the instance of the other role raises an error
naming the hook and both roles (as vLLM's own connectors assert their role) instead of answering a quiet
default, and the scheduler side gets vLLM's cache manager through the public `bind_kv_cache_manager` hook.
No vLLM server: the connector is built from a stand-in of the config objects it reads."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_helpers import require_vllm


def _vllm_config():
    model = SimpleNamespace(model="/models/m", dtype=torch.bfloat16, get_num_layers=lambda _p: 2,
                            get_total_num_kv_heads=lambda: 2, get_head_size=lambda: 64)
    ktc = SimpleNamespace(kv_role="kv_both", kv_load_failure_policy="recompute",
                          kv_connector_extra_config={"store": "tcp://127.0.0.1:5600"})
    return SimpleNamespace(kv_transfer_config=ktc, model_config=model, parallel_config=None,
                           cache_config=SimpleNamespace(block_size=32, cache_dtype="auto"))


@pytest.fixture(scope="module")
def roles():
    require_vllm()
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvrelay.engines.vllm.connector import KVRelayConnector
    made = {role: KVRelayConnector(_vllm_config(), role) for role in (KVConnectorRole.SCHEDULER, KVConnectorRole.WORKER)}
    yield made
    for c in made.values():
        c.shutdown()


def _meta():
    from kvrelay.engines.vllm.connector import KVRelayMetadata
    return KVRelayMetadata()


WORKER_HOOKS = {
    "register_kv_caches": lambda c: c.register_kv_caches({}),
    "handle_preemptions": lambda c: c.handle_preemptions(_meta()),
    "bind_connector_metadata": lambda c: c.bind_connector_metadata(_meta()),
    "start_load_kv": lambda c: c.start_load_kv(None),
    "save_kv_layer": lambda c: c.save_kv_layer("model.layers.0.self_attn.attn", torch.empty(0), None),
    "wait_for_save": lambda c: c.wait_for_save(),
    "get_finished": lambda c: c.get_finished(set()),
    "get_block_ids_with_load_errors": lambda c: c.get_block_ids_with_load_errors(),
}
REQUEST = SimpleNamespace(request_id="r1", prompt_token_ids=[1, 2, 3], kv_transfer_params=None, cache_salt=None)
SCHEDULER_HOOKS = {
    "bind_kv_cache_manager": lambda c: c.bind_kv_cache_manager(SimpleNamespace(block_pool=None)),
    "get_num_new_matched_tokens": lambda c: c.get_num_new_matched_tokens(REQUEST, 0),
    "update_state_after_alloc": lambda c: c.update_state_after_alloc(REQUEST, None, 0),
    "build_connector_meta": lambda c: c.build_connector_meta(None),
    "update_connector_output": lambda c: c.update_connector_output(SimpleNamespace()),
    "request_finished": lambda c: c.request_finished(REQUEST, []),
}


@pytest.mark.parametrize("hook", sorted(WORKER_HOOKS))
def test_a_worker_hook_on_the_scheduler_instance_raises_naming_it(roles, hook):
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvrelay.engines.vllm.connector import ConnectorRoleError
    with pytest.raises(ConnectorRoleError, match=rf"{hook} is a worker-side hook.*SCHEDULER instance"):
        WORKER_HOOKS[hook](roles[KVConnectorRole.SCHEDULER])


@pytest.mark.parametrize("hook", sorted(SCHEDULER_HOOKS))
def test_a_scheduler_hook_on_the_worker_instance_raises_naming_it(roles, hook):
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvrelay.engines.vllm.connector import ConnectorRoleError
    with pytest.raises(ConnectorRoleError, match=rf"{hook} is a scheduler-side hook.*WORKER instance"):
        SCHEDULER_HOOKS[hook](roles[KVConnectorRole.WORKER])


def test_a_worker_hook_before_register_kv_caches_says_so(roles):
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvrelay.engines.vllm.connector import ConnectorRoleError
    with pytest.raises(ConnectorRoleError, match="get_finished was called before register_kv_caches"):
        roles[KVConnectorRole.WORKER].get_finished(set())


def test_saves_read_blocks_from_the_manager_bound_through_the_public_hook(roles):
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvrelay.engines.vllm.connector import ConnectorRoleError, KVRelayMetadata
    sched = roles[KVConnectorRole.SCHEDULER]
    step = SimpleNamespace(num_scheduled_tokens={"r1": 3}, preempted_req_ids=None,
                           scheduled_new_reqs=[SimpleNamespace(req_id="r1", num_computed_tokens=0)],
                           scheduled_cached_reqs=SimpleNamespace(req_ids=[], num_computed_tokens=[]))
    with pytest.raises(ConnectorRoleError, match="bind_kv_cache_manager"):
        sched.build_connector_meta(step)
    blocks = SimpleNamespace(get_block_ids=lambda: ([7, 8],))
    manager = SimpleNamespace(block_pool=object(), get_blocks=lambda rid: blocks)
    sched.bind_kv_cache_manager(manager)
    sched.sched.track("r1", [5, 6, 7], None)
    meta = sched.build_connector_meta(step)
    assert isinstance(meta, KVRelayMetadata)
    assert [(s.req_id, s.block_ids) for s in meta.saves] == [("r1", [7])]  # 3 tokens: one 32-token block
