"""The vLLM connector's scheduler side addresses a request by its cache_salt: a stored prefix is offered to a
request of the same salt, not to one of another salt (no vLLM server: a store in this process)."""

from __future__ import annotations

from tenant_helpers import CHUNK, payload, put
from kvrelay.keys import ChunkKey, block_hashes

class CoreClient:
    """The scheduler's LookupClient over a StoreCore."""

    def __init__(self, core) -> None:
        self.core = core

    def lookup(self, keys: list[ChunkKey], tenant: str = "") -> int:
        return self.core.lookup(keys, tenant=tenant)

    def ping(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_scheduler_offers_a_stored_prefix_to_its_salt_only(make_core):
    from kvrelay.engines.vllm.config import RelayConfig
    from kvrelay.engines.vllm.scheduler import SchedulerSide

    core = make_core()
    cfg = RelayConfig(role="kv_both", store="tcp://127.0.0.1:1", chunk_tokens=32, model_id="m")
    prompt = list(range(1000, 1100))  # 3 whole chunks and a partial one
    for i, h in enumerate(block_hashes(prompt, 32, "m", "compat", "alice")[:3]):
        for layer in range(2):
            put(core, ChunkKey(h, layer, 0, 4), payload(10 * i + layer, CHUNK), tenant="alice")
    sched = SchedulerSide(cfg, "compat", num_layers=2, total_kv_heads=4, block_size=16,
                          client_factory=lambda: CoreClient(core))
    try:
        assert sched.matched_tokens("r1", prompt, None, 0, "alice") == (96, True)
        assert sched.matched_tokens("r2", prompt, None, 0, "mallory") == (0, False)
        assert sched.matched_tokens("r3", prompt, None, 0) == (0, False)
        t = core.stats()["tenants"]
        assert t["alice"]["lookup_chunks_hit"] == 6 and t["mallory"].get("lookup_chunks_hit", 0) == 0
    finally:
        sched.close()
