"""Real processes over HTTP: a store daemon, a colocated, a prefill and a decode `kvrelay engine`;
OpenAI routes, SSE streaming, errors, metrics and health, and P/D through HTTP == colocated."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid

import pytest

from engine_helpers import StoreProc, rand_prompt
from kvrelay import proc

pytestmark = pytest.mark.slow  # starts several processes: not in the fast tier (-m 'not slow')


class EngineProc:
    """A `kvrelay engine` process (kvrelay.proc), its log beside its ready file in ``tmp``."""

    def __init__(self, tmp, *args: str) -> None:
        ready = tmp / f"engine-{uuid.uuid4().hex[:6]}.json"
        self.log_path = tmp / f"{ready.stem}.log"
        self.child = proc.spawn_kvrelay(["engine", "--port", "0", "--threads", "1", "--num-blocks", "512",
                                         "--max-model-len", "2048", "--log-level", "WARNING", *args],
                                        name="engine", log=self.log_path, log_mode="ab", ready_file=ready,
                                        tail_lines=60)

    def wait(self, timeout: float = 90.0) -> "EngineProc":
        try:
            self.url = self.child.wait_ready(timeout)["url"]
        except proc.StartError:
            self.close()
            raise
        return self

    def close(self) -> None:
        self.child.stop(15)


def post(url: str, body: dict, timeout: float = 120.0) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str, timeout: float = 30.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    store = StoreProc(tmp, pool_size="256MiB", transports="shm,tcp")
    procs: list[EngineProc] = []
    try:
        procs.append(EngineProc(tmp, "--role", "colocated"))
        procs.append(EngineProc(tmp, "--role", "prefill", "--store", store.address, "--block-size", "16"))
        procs.append(EngineProc(tmp, "--role", "decode", "--store", store.address, "--transport", "tcp",
                                "--block-size", "32", "--pull-timeout", "20"))
        for p in procs:  # start together, wait together: the three load in parallel
            p.wait()
        yield {"colocated": procs[0].url, "prefill": procs[1].url, "decode": procs[2].url}
    finally:
        for p in procs:
            p.close()
        store.close()


@pytest.mark.timeout(300)
def test_pd_over_http_matches_colocated(cluster):
    for i, n in enumerate((1, 37, 300, 700)):
        prompt = rand_prompt(n, seed=7000 + i)
        body = {"prompt": prompt, "max_tokens": 4}
        s, col = post(cluster["colocated"] + "/v1/completions", body)
        assert s == 200, col
        s, pre = post(cluster["prefill"] + "/v1/completions", body)
        assert s == 200, pre
        kp = pre["kv_transfer_params"]
        assert pre["choices"][0]["token_ids"] == col["choices"][0]["token_ids"][:1]
        assert kp["first_token"] == col["choices"][0]["token_ids"][0] and kp["num_tokens"] == n
        s, dec = post(cluster["decode"] + "/v1/completions", {**body, "kv_transfer_params": kp})
        assert s == 200, dec
        assert "kvrelay" not in dec  # pulled, not recomputed
        assert dec["choices"][0]["token_ids"] == col["choices"][0]["token_ids"]
        assert dec["choices"][0]["text"] == col["choices"][0]["text"]
    s, metrics = get(cluster["decode"] + "/metrics")
    assert s == 200 and b'kvrelay_engine_pulls_total{reason="",result="ok"} 4.0' in metrics
    s, metrics = get(cluster["prefill"] + "/metrics")
    assert b"kvrelay_engine_published_chunks_total" in metrics


@pytest.mark.timeout(120)
def test_openai_routes(cluster):
    url = cluster["colocated"]
    s, body = post(url + "/v1/completions", {"prompt": "hello kvrelay", "max_tokens": 3})
    assert s == 200 and body["object"] == "text_completion" and body["usage"]["prompt_tokens"] == 13
    assert len(body["choices"][0]["token_ids"]) == 3 and body["choices"][0]["finish_reason"] == "length"
    s, chat = post(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert s == 200 and chat["object"] == "chat.completion"
    assert isinstance(chat["choices"][0]["message"]["content"], str)
    s, models = get(url + "/v1/models")
    assert s == 200 and json.loads(models)["data"][0]["id"].startswith("kvrelay-ref-")
    assert get(url + "/healthz")[0] == 200 and get(url + "/readyz")[0] == 200


@pytest.mark.timeout(120)
def test_sse_streaming_matches_the_plain_answer(cluster):
    url = cluster["colocated"]
    body = {"prompt": rand_prompt(20, seed=3), "max_tokens": 4}
    _, plain = post(url + "/v1/completions", body)
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [line[6:] for line in r.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == plain["choices"][0]["token_ids"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.timeout(60)
def test_bad_requests_get_clear_400s(cluster):
    url = cluster["colocated"]
    s, body = post(url + "/v1/completions", {"prompt": [1, 2, 10 ** 6]})
    assert s == 400 and "vocabulary" in body["error"]["message"]
    s, body = post(url + "/v1/completions", {"prompt": "x", "max_tokens": 0})
    assert s == 400 and "max_tokens" in body["error"]["message"]
    s, body = post(url + "/v1/completions", {"prompt": "x", "model": "gpt-9"})
    assert s == 404 and "not served" in body["error"]["message"]
    s, body = post(url + "/v1/chat/completions", {"messages": []})
    assert s == 400 and "messages" in body["error"]["message"]
    s, body = post(cluster["colocated"] + "/v1/completions", {"prompt": "x", "max_tokens": 5000})
    assert s == 400 and "max_model_len" in body["error"]["message"]
