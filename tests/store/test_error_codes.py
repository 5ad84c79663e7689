"""The store's one error-code enum (`kvrelay.store.errors.StoreCode`, issue 21): every code has its mapping
on the wire, in the client and in the connector's failures, and an over-quota tenant is reported as
``quota`` (it used to be counted as ``refused``: the connector's map lacked the code)."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import CollectorRegistry

from kvrelay.connector import EngineCache, FailureCode, LayerPublisher, PublishPhase, PublishRequest, TransferMetrics
from kvrelay.connector.state import _STORE_CODES
from kvrelay.keys import ChunkKey
from kvrelay.kernels.layout import KVLayout, Order
from kvrelay.store import protocol as P
from kvrelay.store.client import StoreClient
from kvrelay.store.control import reply_error
from kvrelay.store.errors import OpError, StoreCode, StoreError, StoreFullError
from kvrelay.store.process import DaemonProcess

MODEL = "error-codes-model"
CHUNK_TOKENS = 64
# what the client raises for a daemon's refusal (StoreError for the other codes)
CLIENT_RAISES: dict[StoreCode, type[Exception]] = {StoreCode.FULL: StoreFullError, StoreCode.TIMEOUT: TimeoutError}


def test_every_code_has_a_connector_failure():
    assert set(_STORE_CODES) == set(StoreCode), "a store code with no FailureCode is counted as 'refused'"
    for code in StoreCode:
        assert FailureCode.of(StoreError("x", code)) is _STORE_CODES[code]
        assert FailureCode.of(StoreError("x", code.value)) is _STORE_CODES[code]  # the plain string alike
    assert _STORE_CODES[StoreCode.QUOTA] is FailureCode.QUOTA
    assert _STORE_CODES[StoreCode.FULL] is FailureCode.STORE_FULL


@pytest.mark.parametrize("code", [c for c in StoreCode if c.wire])
def test_every_wire_code_crosses_the_wire_and_the_client_raises_it(code):
    refusal = OpError(code, f"refused with {code}")  # what the daemon's core raises; the server replies with it
    rep = P.decode_reply(P.encode(P.Reply(req_id=7, ok=False, code=refusal.code, error=str(refusal))))
    assert rep.code == code.value and not rep.ok
    exc = reply_error(rep)
    assert type(exc) is CLIENT_RAISES.get(code, StoreError)
    if isinstance(exc, StoreError):
        assert exc.code is code and str(exc) == f"refused with {code}"
    assert FailureCode.of(exc) is _STORE_CODES[code]


def test_client_only_codes_never_cross_the_wire():
    assert {c for c in StoreCode if not c.wire} == {StoreCode.CLOSED, StoreCode.UNREACHABLE}
    for code in (StoreCode.CLOSED, StoreCode.UNREACHABLE):
        assert FailureCode.of(StoreError("x", code)) is FailureCode.UNAVAILABLE


def test_unknown_codes():
    with pytest.raises(ValueError, match="no_such_code"):  # the daemon only refuses with a known code
        OpError("no_such_code", "x")
    # a newer daemon's code this client does not know: kept as its string, counted as refused
    exc = reply_error(P.Reply(req_id=1, ok=False, code="from_the_future", error="why"))
    assert type(exc) is StoreError and exc.code == "from_the_future" and not isinstance(exc.code, StoreCode)
    assert FailureCode.of(exc) is FailureCode.REFUSED


def test_undecodable_requests_get_bad_request_or_version():
    with pytest.raises(P.BadRequest) as bad:
        P.decode_request(b"\x00not msgpack")
    assert bad.value.code is StoreCode.BAD_REQUEST
    with pytest.raises(P.BadRequest, match="version 99") as old:
        P.decode_request(P.encode(P.Ping(version=99)))
    assert old.value.code is StoreCode.VERSION


@pytest.fixture(scope="module")
def quota_daemon():
    d = DaemonProcess(pool_size="16MiB", tenant_quotas="alice=256KiB").start()
    try:
        yield d
    finally:
        d.stop()


def test_over_quota_reservation_through_the_real_client_is_quota(quota_daemon):
    keys = [(ChunkKey(f"{i:032x}", 0, 0, 8), 192 << 10) for i in range(2)]  # 384 KiB against 256 KiB
    with StoreClient(quota_daemon.address, compat_hash="error-codes") as c:
        with pytest.raises(StoreError, match="tenant 'alice' is over its quota") as exc:
            c.reserve("over-quota", keys, tenant="alice")
        assert exc.value.code is StoreCode.QUOTA and not isinstance(exc.value, StoreFullError)
        assert FailureCode.of(exc.value) is FailureCode.QUOTA
        c.reserve("no-quota", keys, tenant="bob")  # negative control: bob has no quota, the pool has room
        c.release("no-quota")


def test_over_quota_publish_is_counted_as_quota_not_refused(quota_daemon):
    layout = KVLayout(num_layers=3, num_blocks=64, block_size=16, num_kv_heads=2, head_dim=16, dtype=torch.float32,
                      order=Order.NHD, kv_fused=True)
    reg = CollectorRegistry()
    cache = EngineCache(layout, layout.allocate(), MODEL, layout.compat_hash(MODEL), "epoch-1",
                        TransferMetrics(reg, "test"))
    client = StoreClient(quota_daemon.address, compat_hash=layout.compat_hash(MODEL), staging_bytes=8 << 20)
    pub = LayerPublisher(client, quota_daemon.address, "shm", chunk_tokens=CHUNK_TOKENS)
    pub.bind(cache)
    try:
        prompt = list(range(640))  # 10 chunks x 3 layers x 16 KiB = 480 KiB against alice's 256 KiB
        states = pub.begin([PublishRequest("alice-1", prompt, list(range(40)), cache_salt="alice"),
                            PublishRequest("bob-1", prompt, list(range(40)), cache_salt="bob")])
        alice, bob = states
        assert alice.phase is PublishPhase.REFUSED and alice.failure is not None
        assert alice.failure.code is FailureCode.QUOTA and "over its quota" in alice.failure.message
        assert bob.phase is PublishPhase.PUBLISHING  # negative control: the same prompt for another tenant
        count = reg.get_sample_value
        assert count("test_publish_errors_total", {"reason": "quota"}) == 1
        assert (count("test_publish_errors_total", {"reason": "refused"}) or 0) == 0
        for layer in range(layout.num_layers):
            pub.layer_done(layer)
        pub.end(states, [1, 1], lambda s: None)
    finally:
        pub.close()
