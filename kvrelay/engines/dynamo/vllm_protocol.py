"""KVRelayConnector in Dynamo's own vLLM worker (``python -m dynamo.vllm``), without editing Dynamo.

Dynamo's vLLM prefill handler asks a per-connector "P/D protocol" for the prefill's ``kv_transfer_params``
and for what the decode gets, and refuses a ``kv_connector`` it has none for ("Unsupported kv_connector
... add it to KV_CONNECTOR_PROTOCOLS").  `register` adds kvrelay's to that table at run time;
``python -m kvrelay.engines.dynamo.vllm_protocol ARGS`` registers it and runs ``dynamo.vllm``'s main
with ARGS (e.g. ``--kv-transfer-config '{"kv_connector": "KVRelayConnector", ...}'``).  The protocol:
the prefill request carries ``{"do_remote_decode": true, "kvrelay_request_id": ID}`` and the decode the
prefill's answered ``kv_transfer_params`` (with ``do_remote_prefill``), as behind `kvrelay router`.

Where ``dynamo.vllm`` cannot be imported (here: it needs torchvision, which breaks the CPU torch),
`kvrelay dynamo-worker --engine-url` puts a vLLM server behind Dynamo instead.  Owns: the protocol
class and its registration.  Must not touch: Dynamo's files.
"""

from __future__ import annotations

import sys
import uuid
from typing import Any

from dynamo.vllm import kv_connector_protocols as _protocols

from kvrelay.params import DO_REMOTE_DECODE, RELAY_ID

CONNECTOR = "KVRelayConnector"


class KVRelayConnectorProtocol(_protocols.KvConnectorProtocol):
    """One per prefill request: its kvrelay request id names both legs."""

    def __init__(self, vllm_config: Any) -> None:
        super().__init__(vllm_config)
        self.relay_id = uuid.uuid4().hex

    def prefill_request_kv_transfer_params(self) -> dict[str, Any]:
        return {DO_REMOTE_DECODE: True, RELAY_ID: self.relay_id}

    def decode_request_kv_transfer_params(self, prefill_response: Any) -> dict[str, Any] | None:
        return prefill_response.kv_transfer_params  # KVTransferParams + do_remote_prefill (our scheduler's)


def register() -> None:
    _protocols.KV_CONNECTOR_PROTOCOLS.setdefault(CONNECTOR, KVRelayConnectorProtocol)


def main(argv: list[str] | None = None) -> int:
    register()
    from dynamo.vllm.main import main as dynamo_vllm_main
    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    dynamo_vllm_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
