"""The vLLM connector's scheduler side tells the worker which requests vLLM aborted while their prompt KV
was being saved (issue 26), so that the worker's publisher stops and gives the store reservation back
(`LayerPublisher.abort`, shown on a real store in tests/engine/test_engine_prefill_abort.py).  No vLLM
server: the scheduler side is driven as vLLM's hooks drive it."""

from __future__ import annotations

from kvrelay.engines.vllm.config import RelayConfig
from kvrelay.engines.vllm.scheduler import SchedulerSide
from kvrelay.params import DO_REMOTE_DECODE, RELAY_ID


def _no_store():
    raise AssertionError("a producer's scheduler side looks nothing up")


def _saving(side: SchedulerSide, req_id: str, relay_id: str) -> None:
    tokens = list(range(100))
    assert side.matched_tokens(req_id, tokens, {DO_REMOTE_DECODE: True, RELAY_ID: relay_id}, 0) == (0, False)
    meta = side.build_meta([(req_id, 0, len(tokens))], lambda _r: list(range(7)))
    assert [s.relay_id for s in meta.saves] == [relay_id] and meta.aborted == []


def test_a_request_aborted_while_saved_is_named_in_the_next_step_only():
    side = SchedulerSide(RelayConfig("kv_producer", "tcp://127.0.0.1:9"), "compat", 2, 2, 16, _no_store)
    _saving(side, "vllm-a", "relay-a")
    _saving(side, "vllm-b", "relay-b")
    delay_free, params = side.finished("vllm-a", aborted=True)
    assert delay_free and params is not None  # its blocks wait for the worker's report, as for any save
    assert side.finished("vllm-b", aborted=False)[0]  # finished normally: its publish goes on
    assert side.build_meta([], lambda _r: []).aborted == ["relay-a"]
    assert side.build_meta([], lambda _r: []).aborted == []  # told once


def test_an_aborted_request_that_saved_nothing_is_not_named():
    side = SchedulerSide(RelayConfig("kv_producer", "tcp://127.0.0.1:9"), "compat", 2, 2, 16, _no_store)
    assert side.matched_tokens("vllm-c", list(range(100)), {DO_REMOTE_DECODE: True}, 0) == (0, False)
    assert side.finished("vllm-c", aborted=True) == (False, None)
    assert side.build_meta([], lambda _r: []).aborted == []
