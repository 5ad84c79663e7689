"""The pieces of the Dynamo integration that need no running Dynamo: the loopback event broker, the DYN_*
environment, the model directory's tokenizer and chat template, the request/handoff translation, and
`kvrelay dynamo-worker`'s refusal of bad flags (one line, exit 2).  About 10 s."""

from __future__ import annotations

import time
import pytest
import zmq

from kvrelay.engines.dynamo import env
from kvrelay.engines.dynamo.broker import EventBroker
from kvrelay.engines.dynamo.model_dir import CHAT_TEMPLATE, add_byte_tokenizer, check_model_dir
from kvrelay.engines.reference.config import ModelConfig
from kvrelay.tokenizer import ByteTokenizer, HFTokenizer, apply_chat_template
from kvrelay.engines.reference.weights import write_random_checkpoint

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2, num_kv_heads=1,
             head_dim=32)


def test_broker_forwards_on_loopback():
    broker = EventBroker().start()
    ctx = zmq.Context()
    try:
        assert env.check_broker_url(broker.url) == broker.url
        pub, sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
        for s in (pub, sub):
            s.setsockopt(zmq.LINGER, 0)
        pub.connect(f"tcp://127.0.0.1:{broker.xsub_port}")
        sub.connect(f"tcp://127.0.0.1:{broker.xpub_port}")
        sub.setsockopt(zmq.SUBSCRIBE, b"kv")
        got = None
        deadline = time.monotonic() + 10
        while got is None and time.monotonic() < deadline:  # PUB/SUB: the subscription travels first
            pub.send_multipart([b"kv", b"event"])
            if sub.poll(100):
                got = sub.recv_multipart()
        assert got == [b"kv", b"event"]
        pub.close()
        sub.close()
    finally:
        broker.close()
        ctx.term()


def test_dynamo_env_is_loopback_and_checks_its_values(tmp_path):
    e = env.dynamo_env(tmp_path, env.broker_url(5611, 5612), system_port=9101)
    assert e["DYN_DISCOVERY_BACKEND"] == "file" and e["DYN_FILE_KV"] == str(tmp_path.resolve())
    assert all(e[k] == "127.0.0.1" for k in ("DYN_TCP_RPC_HOST", "DYN_TCP_RESPONSE_STREAM_HOST",
                                             "DYN_EVENT_PLANE_HOST", "DYN_SYSTEM_HOST", "DYN_HTTP_HOST"))
    assert e["DYN_ZMQ_BROKER_URL"] == "xsub=tcp://127.0.0.1:5611,xpub=tcp://127.0.0.1:5612"
    with pytest.raises(ValueError, match="0.0.0.0"):
        env.dynamo_env(tmp_path, "xsub=tcp://0.0.0.0:1,xpub=tcp://0.0.0.0:2")
    with pytest.raises(ValueError, match="32767"):
        env.dynamo_env(tmp_path, env.broker_url(1, 2), system_port=40000)
    with pytest.raises(ValueError, match="not a directory"):
        env.dynamo_env(tmp_path / "missing", env.broker_url(1, 2))


def test_byte_tokenizer_and_chat_template_match_the_reference_engine(tmp_path):
    jinja2 = pytest.importorskip("jinja2")
    d = add_byte_tokenizer(write_random_checkpoint(tmp_path / "ck", ModelConfig(**SMALL)))
    assert check_model_dir(d) == d
    hf, byte = HFTokenizer(d / "tokenizer.json"), ByteTokenizer(256)
    text = "héllo <|user|>\n\x00 wörld ✓"
    assert hf.encode(text) == byte.encode(text)
    assert hf.decode(list(range(32, 127))) == byte.decode(list(range(32, 127)))
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi\n"}]
    # as transformers and Dynamo's frontend render it: trim_blocks, and a template's trailing newline dropped
    rendered = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(CHAT_TEMPLATE).render(
        messages=msgs, add_generation_prompt=True)
    assert rendered == apply_chat_template(msgs)
    assert rendered != apply_chat_template(msgs[1:])  # negative control


def test_translation_of_requests_and_handoff():
    pytest.importorskip("dynamo.common.backend", reason="NVIDIA Dynamo is not installed")
    from dynamo.llm.exceptions import InvalidArgument

    from kvrelay.engines.dynamo.common import sampling_params
    from kvrelay.engines.dynamo.engine import decode_params
    p = sampling_params({"token_ids": [1, 2], "sampling_options": {"temperature": 0.0, "seed": 3},
                         "stop_conditions": {"max_tokens": 5, "stop_token_ids_hidden": [7], "stop_token_ids": [9]}},
                        eos=(0, 7), max_model_len=100)
    assert (p.max_tokens, p.temperature, p.seed, p.stop_token_ids) == (5, 0.0, 3, (7, 9, 0))
    assert sampling_params({"token_ids": [1, 2]}, eos=(), max_model_len=10).max_tokens == 8
    with pytest.raises(InvalidArgument, match="n=2"):
        sampling_params({"token_ids": [1], "sampling_options": {"n": 2}}, eos=(), max_model_len=10)
    assert decode_params({"token_ids": [1]}) is None  # no prefill: computed locally
    assert decode_params({"prefill_result": {"disaggregated_params": {"kv_transfer_params": None}}}) is None
    with pytest.raises(InvalidArgument, match="not a kvrelay worker"):
        decode_params({"prefill_result": {"disaggregated_params": {"remote_block_ids": [1]}}})
    with pytest.raises(InvalidArgument, match="malformed kv_transfer_params"):
        decode_params({"prefill_result": {"disaggregated_params": {"kv_transfer_params": {"request_id": "x"}}}})


@pytest.mark.parametrize("case,needle", [
    ("no_tokenizer", "no tokenizer.json"),
    ("no_store", "needs --store"),
    ("bad_broker", "--event-broker"),
    ("bad_engine_flag", "bad engine flags"),
])
def test_worker_refuses_bad_flags_in_one_line(tmp_path, capsys, case, needle):
    pytest.importorskip("dynamo.common.backend", reason="NVIDIA Dynamo is not installed")
    ck = write_random_checkpoint(tmp_path / "ck", ModelConfig(**SMALL))
    if case != "no_tokenizer":
        add_byte_tokenizer(ck)
    args = ["--role", "decode", "--checkpoint", str(ck), "--discovery-dir", str(tmp_path),
            "--event-broker", env.broker_url(1, 2), "--store", "tcp://127.0.0.1:1"]
    if case == "no_store":
        args.remove("--store")
        args.remove("tcp://127.0.0.1:1")
    elif case == "bad_broker":
        args[args.index("--event-broker") + 1] = "tcp://0.0.0.0:1"
    elif case == "bad_engine_flag":
        args += ["--block-size", "banana"]
    from kvrelay.engines.dynamo.worker import main
    assert main(args) == 2  # in-process: flags are checked before Dynamo's runtime starts
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("kvrelay dynamo-worker:")]
    assert len(lines) == 1 and needle in lines[0], err[-2000:]
    assert "Traceback" not in err


def test_kvrelay_protocol_is_accepted_by_dynamo_vllm_after_register():
    protocols = pytest.importorskip("dynamo.vllm.kv_connector_protocols", reason="NVIDIA Dynamo is not installed")
    from types import SimpleNamespace

    from kvrelay.engines.dynamo import vllm_protocol
    cfg = SimpleNamespace(kv_transfer_config=SimpleNamespace(kv_connector="KVRelayConnector"))
    protocols.KV_CONNECTOR_PROTOCOLS.pop("KVRelayConnector", None)
    with pytest.raises(ValueError, match="Unsupported kv_connector"):  # Dynamo's allow-list, as installed
        protocols.make_kv_connector_protocol(cfg)
    vllm_protocol.register()
    try:
        proto = protocols.make_kv_connector_protocol(cfg)
        assert isinstance(proto, vllm_protocol.KVRelayConnectorProtocol)
        params = proto.prefill_request_kv_transfer_params()
        assert params == {"do_remote_decode": True, "kvrelay_request_id": proto.relay_id}
        answered = {"request_id": "x", "do_remote_prefill": True}
        assert proto.decode_request_kv_transfer_params(SimpleNamespace(kv_transfer_params=answered)) is answered
        # inside vLLM's MultiConnector / Dynamo's PdConnector too
        multi = SimpleNamespace(kv_transfer_config=SimpleNamespace(
            kv_connector="MultiConnector", kv_connector_extra_config={"connectors": [
                {"kv_connector": "KVRelayConnector"}, {"kv_connector": "OffloadingConnector"}]}))
        assert isinstance(protocols.make_kv_connector_protocol(multi), vllm_protocol.KVRelayConnectorProtocol)
    finally:
        protocols.KV_CONNECTOR_PROTOCOLS.pop("KVRelayConnector", None)
