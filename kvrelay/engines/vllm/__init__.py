"""kvrelay inside vLLM: `KVRelayConnector`, loaded by vLLM through
``"kv_connector": "KVRelayConnector", "kv_connector_module_path": "kvrelay.engines.vllm"``.

Reading path:
  config.py     RelayConfig: kv_role and kv_connector_extra_config, validated at start-up
  meta.py       what the scheduler side tells the worker side each step; kv_transfer_params fields
  scheduler.py  SchedulerSide: lookups, loads, saves, delay_free, the params a prefill leg answers with
  worker.py     WorkerSide: kvrelay.connector's LayerPublisher / LayerPuller on vLLM's cache
  layout.py     the KVLayout of vLLM's caches; the CPU attention's in-block order, measured
  connector.py  KVRelayConnector: vLLM's hooks mapped onto the two sides
  stats.py      vLLM connector stats and kvrelay:* Prometheus counters
  checkpoint.py, process.py  a seeded Llama checkpoint; one vLLM server as a subprocess (tests, launcher)

The connector is imported lazily (`KVRelayConnector` below), so the helpers load without vLLM.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "KVRelayConnector":
        from kvrelay.engines.vllm.connector import KVRelayConnector
        return KVRelayConnector
    raise AttributeError(f"module 'kvrelay.engines.vllm' has no attribute {name!r}")
