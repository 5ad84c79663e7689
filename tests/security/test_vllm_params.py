"""With keys on, the vLLM connector's scheduler side acts on ``kv_transfer_params`` only when the router
signed them for their relay id (as the reference engine checks them); a prefill leg's answer is signed so a
decode leg sent with it (vLLM's proxy convention) is accepted.  No vLLM server: the scheduler side alone."""

from __future__ import annotations

import pytest

from kvrelay import security
from kvrelay.params import DO_REMOTE_DECODE, DO_REMOTE_PREFILL, RELAY_ID
from kvrelay.security import params as signed_params

pytest.importorskip("vllm")


class LiveStore:
    """A LookupClient whose store answers pings (a decode leg loads only from a live store) and holds nothing."""

    def lookup(self, keys, tenant: str = "") -> int:
        return 0

    def ping(self) -> None:
        pass

    def close(self) -> None:
        pass


def _sched():
    from kvrelay.engines.vllm.config import RelayConfig
    from kvrelay.engines.vllm.scheduler import SchedulerSide
    cfg = RelayConfig(role="kv_both", store="tcp://127.0.0.1:1", chunk_tokens=32, model_id="m")
    return SchedulerSide(cfg, "compat", num_layers=2, total_kv_heads=4, block_size=16, client_factory=LiveStore)


PROMPT = list(range(1000, 1100))


def test_signed_decode_params_load_and_unsigned_ones_are_ignored(keys, other_keys):
    decode = {DO_REMOTE_PREFILL: True, RELAY_ID: "rid-1"}
    with security.using(keys):
        sched = _sched()
        try:
            assert sched.matched_tokens("a", PROMPT, signed_params.sign(keys, decode, "rid-1"), 0) == (100, True)
            for name, params in [("unsigned", decode),
                                 ("signed with other keys", signed_params.sign(other_keys, decode, "rid-1")),
                                 ("signed for another id", signed_params.sign(keys, decode, "rid-2")),
                                 ("altered after signing", {**signed_params.sign(keys, decode, "rid-1"),
                                                            RELAY_ID: "rid-3"})]:
                assert sched.matched_tokens(f"req-{name}", PROMPT, params, 0) == (0, False), name
            assert sched.take_counts()["params_refused"] == 4
        finally:
            sched.close()


def test_without_keys_params_are_taken_as_sent():
    sched = _sched()
    try:
        assert sched.matched_tokens("a", PROMPT, {DO_REMOTE_PREFILL: True, RELAY_ID: "r"}, 0) == (100, True)
        assert "params_refused" not in sched.take_counts()
    finally:
        sched.close()


def test_a_prefill_legs_answer_is_signed_for_its_relay_id(keys):
    with security.using(keys):
        sched = _sched()
        try:
            prefill = signed_params.sign(keys, {DO_REMOTE_DECODE: True, RELAY_ID: "rid-9"}, "rid-9")
            sched.track("p", PROMPT, prefill)
            sched._reqs["p"].saving = True  # its prompt was published (the worker's save ran)
            _, answer = sched.finished("p")
            assert answer is not None and answer[DO_REMOTE_PREFILL] is True
            assert signed_params.verify(keys, answer, "rid-9")[RELAY_ID] == "rid-9"
            # and a decode leg sent with that answer is accepted
            assert sched.matched_tokens("d", PROMPT, answer, 0) == (100, True)
        finally:
            sched.close()
