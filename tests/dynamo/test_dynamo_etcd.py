"""kvrelay behind NVIDIA Dynamo with Dynamo's etcd discovery (instead of its file discovery): a real etcd, a
store, a prefill and a decode `kvrelay dynamo-worker --etcd URL` and `kvrelay dynamo-frontend --etcd URL`.
The frontend finds both workers through etcd (their keys are there, under Dynamo's ``v1/`` prefixes), the
greedy output is token-identical to a colocated `kvrelay engine`, and the decode pulled the prompt's KV from
the store.  Over plain http on loopback, and over https with --client-cert-auth (the key directory's etcd
certificates, handed to Dynamo's etcd client as ETCD_AUTH_*: their PEM text).  The environment they get is checked without
Dynamo too."""

from __future__ import annotations

import asyncio
import os

import pytest

from kvrelay.engines.dynamo import env
from kvrelay.security import write_keys
from kvrelay.security.etcdcerts import write_etcd_certs


def test_etcd_discovery_environment(tmp_path, monkeypatch):
    e = env.dynamo_env("http://127.0.0.1:2379", env.broker_url(1, 2))
    assert e["DYN_DISCOVERY_BACKEND"] == "etcd" and e["ETCD_ENDPOINTS"] == "http://127.0.0.1:2379"
    assert "DYN_FILE_KV" not in e and not any(k.startswith("ETCD_AUTH") for k in e)
    with pytest.raises(ValueError, match="not on loopback"):
        env.dynamo_env("http://198.18.0.1:2379", env.broker_url(1, 2))
    monkeypatch.delenv("KVRELAY_KEYS", raising=False)
    with pytest.raises(ValueError, match="pass --keys DIR"):
        env.dynamo_env("https://198.18.0.1:2379", env.broker_url(1, 2))
    keys = write_keys(tmp_path / "keys")
    write_etcd_certs(keys, ["198.18.0.1"])
    monkeypatch.setenv("KVRELAY_KEYS", str(keys))
    e = env.dynamo_env("https://198.18.0.1:2379", env.broker_url(1, 2))
    assert (e["ETCD_AUTH_CA"], e["ETCD_AUTH_CLIENT_CERT"], e["ETCD_AUTH_CLIENT_KEY"]) == tuple(
        (keys / "etcd" / f).read_text() for f in ("ca.crt", "client.crt", "client.key"))  # PEM text, not paths
    assert e["DYN_TCP_TLS_CLIENT_CA_CERT_PATH"] == str(keys / "etcd" / "ca.crt")  # mutual TLS on the TCP planes
    assert e["DYN_TCP_TLS_SERVER_NAME"] == "kvrelay-cluster" and e["DYN_TCP_RPC_HOST"] == "127.0.0.1"
    e = env.dynamo_env("https://198.18.0.1:2379", env.broker_url(1, 2), system_port=9101, host="198.18.0.2")
    assert e["DYN_TCP_RPC_HOST"] == e["DYN_TCP_RESPONSE_STREAM_HOST"] == "198.18.0.2"
    assert e["DYN_SYSTEM_HOST"] == "127.0.0.1" and e["DYN_SELF_HOST_METADATA"] == "0"  # the card goes through etcd
    monkeypatch.setenv("KVRELAY_KEYS", str(write_keys(tmp_path / "no-certs")))
    with pytest.raises(ValueError, match="--advertise-host 198.18.0.2: Dynamo's TCP planes leave loopback only"):
        env.dynamo_env(tmp_path, env.broker_url(1, 2), host="198.18.0.2")


@pytest.mark.slow  # etcd, a store, two Dynamo workers and Dynamo's frontend
@pytest.mark.timeout(600)
@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_pd_behind_dynamo_on_etcd_discovery(tmp_path, tls, monkeypatch):
    pytest.importorskip("dynamo.common.backend", reason="NVIDIA Dynamo is not installed (pip install "
                        "ai-dynamo-runtime==1.6.1 && pip install --no-deps ai-dynamo==1.6.1)")
    pytest.importorskip("openai", reason="the openai client is not installed")
    from dynamo_helpers import MODEL, Cluster, chat, free_port, metric, pd_checkpoint, wait_pd
    from etcd_helpers import EtcdProcess
    from test_dynamo_pd import PROMPT_A, colocated

    from kvrelay.engines.dynamo.broker import EventBroker
    from kvrelay.membership import EtcdClient, EtcdTLS

    monkeypatch.delenv("KVRELAY_KEYS", raising=False)
    keys = None
    if tls:
        keys = write_keys(tmp_path / "keys")
        write_etcd_certs(keys, ["127.0.0.1"])
    etcd = EtcdProcess(tmp_path, keys=keys).start()
    ck = pd_checkpoint(tmp_path / "ck", "kvrelay-dynamo-etcd-test")
    broker = EventBroker().start()
    c = Cluster(tmp_path)
    try:
        colo = c.spawn("colocated", "engine", "--role", "colocated", "--checkpoint", str(ck), "--port", "0",
                       "--threads", "1", ready_file=tmp_path / "colo.json")  # the reference: no keys
        if keys:
            c.env = c.env | {"KVRELAY_KEYS": str(keys)}  # the store, workers and frontend: the key directory's
        store = c.spawn("store", "store", "--port", "0", "--metrics-port", "0", "--pool-size", "256MiB",
                        "--pool-name", f"kvrelay-dynetcd-{os.getpid()}-{int(tls)}", "--ssd-dir", "",
                        ready_file=tmp_path / "store.json")
        store_address = store.wait_ready(60)["address"]
        ports = {"prefill": free_port(32768), "decode": free_port(32768), "http": free_port()}
        common = ["--checkpoint", str(ck), "--served-model-name", MODEL, "--etcd", etcd.url,
                  "--event-broker", broker.url, "--store", store_address, "--threads", "1"]
        for role in ("prefill", "decode"):
            c.spawn(role, "dynamo-worker", "--role", role, "--metrics-port", str(ports[role]), *common)
        c.spawn("frontend", "dynamo-frontend", "--etcd", etcd.url, "--event-broker", broker.url,
                "--http-port", str(ports["http"]))
        import openai
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{ports['http']}/v1", api_key="none", timeout=120,
                               max_retries=0)
        wait_pd(c, client, lambda: metric(ports["decode"], "kvrelay_engine_pulled_bytes_total"))
        before = metric(ports["decode"], "kvrelay_engine_pulled_bytes_total")
        ids, nvext = chat(client, PROMPT_A)
        expected, _ = colocated(colo.wait_ready(120)["url"], PROMPT_A)
        assert ids == expected, "P/D behind Dynamo on etcd discovery differs from the colocated engine"
        assert metric(ports["decode"], "kvrelay_engine_pulled_bytes_total") > before, "the decode pulled no KV"

        async def keys_in_etcd() -> list[bytes]:
            client = EtcdClient(etcd.url, tls=EtcdTLS.from_keys_dir(keys) if keys else None)
            try:
                return [kv.key for kv in (await client.range_prefix(b"v1/"))[0]]
            finally:
                await client.close()
        found = asyncio.run(keys_in_etcd())
        print(f"Dynamo's keys in etcd: {found}")
        assert any(k.startswith(b"v1/instances/") for k in found), found  # the workers registered there
        for name in ("prefill", "decode", "frontend"):
            log = (tmp_path / f"{name}.log").read_text(errors="replace")
            assert "DYN_FILE_KV" not in log and "file discovery" not in log.lower(), name
    finally:
        c.close()
        broker.close()
        etcd.kill()
