"""What both kvrelay engines for Dynamo share (engine.py in-process, remote.py over HTTP): each role's
Dynamo `DisaggregationMode`, the key of kvrelay's params inside ``disaggregated_params``, and Dynamo's
sampling options and stop conditions as the reference engine's `SamplingParams`.  Needs ``ai-dynamo``.

Owns: those three.  Must not touch: the engines, the flags (flags.py).
"""

from __future__ import annotations

from typing import Any

from dynamo.common.constants import DisaggregationMode
from dynamo.llm.exceptions import InvalidArgument

from kvrelay.engines.reference.sequence import SamplingParams

MODES = {"colocated": DisaggregationMode.AGGREGATED, "prefill": DisaggregationMode.PREFILL,
         "decode": DisaggregationMode.DECODE}
PARAMS_KEY = "kv_transfer_params"  # inside disaggregated_params


def sampling_params(request: dict[str, Any], eos: tuple[int, ...], max_model_len: int) -> SamplingParams:
    """Dynamo's ``sampling_options`` / ``stop_conditions`` as the reference engine's `SamplingParams`."""
    so = request.get("sampling_options") or {}
    sc = request.get("stop_conditions") or {}
    if (so.get("n") or 1) != 1:
        raise InvalidArgument(f"n={so.get('n')} is not supported by the kvrelay reference engine; send n=1")
    max_tokens = sc.get("max_tokens") or max(1, max_model_len - len(request["token_ids"]))
    stops = tuple(sc.get("stop_token_ids_hidden") or ()) + tuple(sc.get("stop_token_ids") or ()) + eos
    try:
        return SamplingParams(max_tokens=int(max_tokens), temperature=float(so.get("temperature") or 0.0),
                              seed=so.get("seed"), ignore_eos=bool(sc.get("ignore_eos") or False),
                              stop_token_ids=tuple(dict.fromkeys(stops)))
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None
