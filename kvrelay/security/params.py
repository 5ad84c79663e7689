"""Who may set ``kv_transfer_params``: with keys on, only a holder of the cluster's secret (the router).

``kv_transfer_params`` tell a decode worker which chunks to pull and from where; a client that could set
them would make a decode pull (and return the continuation of) another request's KV, or reach a store
of its choosing.  So with keys on:

* the router drops any ``kv_transfer_params`` a client sent (`strip`), and signs the ones it adds
  (`sign`: HMAC-SHA256 with the shared secret over the canonical JSON of the params and the request id,
  put in the params as ``kvrelay_sig``);
* an engine serves a request that carries ``kv_transfer_params`` only if they are signed for that
  request id (`verify`); anything else is answered 403 with a message, and counted (plane ``params``).

Hand clients the key directory's ``token`` file only (HTTP), never the directory: the secret signs.

Owns: the signature.  Must not touch: what the params mean (kvrelay/params.py, the engines).
"""

from __future__ import annotations

import json
from typing import Any

from kvrelay.security.keyfiles import Keys
from kvrelay.security.metrics import refused

FIELD = "kvrelay_sig"
_DOMAIN = b"kvrelay kv_transfer_params v1"


class ParamsRefused(ValueError):
    """Unsigned or badly signed ``kv_transfer_params`` (HTTP 403)."""


def _canonical(params: dict[str, Any]) -> bytes:
    body = {k: v for k, v in params.items() if k != FIELD}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign(keys: Keys, params: dict[str, Any], request_id: str) -> dict[str, Any]:
    """``params`` with their signature for ``request_id`` (a new dict)."""
    return {**params, FIELD: keys.sign(_DOMAIN, request_id.encode(), _canonical(params)).hex()}


def verify(keys: Keys, params: Any, request_id: str, peer: str = "") -> dict[str, Any]:
    """The params without their signature; ParamsRefused unless they are signed for ``request_id``."""
    if not isinstance(params, dict):
        raise ParamsRefused("kv_transfer_params must be a JSON object")
    sig = params.get(FIELD)
    if not isinstance(sig, str):
        refused("params", "unsigned kv_transfer_params", peer)
        raise ParamsRefused("kv_transfer_params are accepted only from the router (signed with the cluster's "
                            "secret); send the request through the router, without kv_transfer_params")
    try:
        mac = bytes.fromhex(sig)
    except ValueError:
        mac = b""
    if not keys.verify(mac, _DOMAIN, request_id.encode(), _canonical(params)):
        refused("params", "badly signed kv_transfer_params", peer)
        raise ParamsRefused(f"kv_transfer_params are not signed for request_id {request_id!r} with the cluster's "
                            f"secret (altered, replayed on another request, or signed with other keys)")
    return {k: v for k, v in params.items() if k != FIELD}


def strip(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` without client-supplied ``kv_transfer_params`` (the router sets its own)."""
    if "kv_transfer_params" not in body:
        return body
    return {k: v for k, v in body.items() if k != "kv_transfer_params"}
