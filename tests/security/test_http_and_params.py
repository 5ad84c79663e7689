"""HTTP bearer tokens (router and engines, tested with the official openai client) and who may set
kv_transfer_params: a real P/D cluster (store, prefill, decode, router) started with --keys."""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from kvrelay import proc
from kvrelay.security import params as signed_params
from store_helpers import Daemon

pytestmark = pytest.mark.slow  # starts several processes: not in the fast tier (-m 'not slow')

ENGINE = ["--num-layers", "2", "--vocab-size", "512", "--threads", "1", "--block-size", "16"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, keys_dir):
    tmp = tmp_path_factory.mktemp("cluster")
    store = Daemon(tmp, pool_size="64MiB", max_chunk_bytes="8MiB", keys=str(keys_dir)).start()
    procs: list[proc.ChildProcess] = []

    def spawn(name: str, *argv: str) -> proc.ChildProcess:
        p = proc.spawn_kvrelay([*argv, "--port", "0", "--keys", str(keys_dir), "--log-level", "WARNING"], name=name,
                               log=tmp / f"{name}.log", ready_file=tmp / f"{name}.json")
        procs.append(p)
        return p

    try:
        started = [spawn(role, "engine", "--role", role, "--store", store.address, *ENGINE)
                   for role in ("prefill", "decode")]
        prefill, decode = (p.wait_ready(300)["url"] for p in started)
        p = spawn("router", "router", "--prefill", prefill, "--decode", decode, "--store", store.address)
        router = p.wait_ready(120)["url"]
        yield {"router": router, "prefill": prefill, "decode": decode, "tmp": tmp}
    finally:
        for p in procs:
            p.signal(signal.SIGTERM)
        for p in procs:
            p.stop(15)  # up to 15 s after the SIGTERM above, then SIGKILL
        store.cleanup()


def post(url: str, body: dict, token: str | None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


PROMPT = [(i * 7 + 3) % 500 + 3 for i in range(300)]


@pytest.mark.timeout(400)
def test_bearer_token_with_the_openai_client(cluster, keys):
    for url in (cluster["router"], cluster["decode"]):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="not-the-token", max_retries=0).completions.create(
                model="", prompt=PROMPT[:20], max_tokens=2)
        status, body = post(f"{url}/v1/completions", {"prompt": PROMPT[:20], "max_tokens": 2}, None)
        assert status == 401 and "Bearer" in body["error"]["message"]
        with urllib.request.urlopen(f"{url}/healthz", timeout=10) as r:  # open: liveness probes need no token
            assert r.status == 200
    client = openai.OpenAI(base_url=f"{cluster['router']}/v1", api_key=keys.token, max_retries=0)
    model = client.models.list().data[0].id
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0)
    assert len(out.choices[0].text) > 0 or out.usage.completion_tokens == 4
    assert (out.model_extra or {}).get("kvrelay") is None, "the P/D path pulled the KV (nothing recomputed)"
    req = urllib.request.Request(f"{cluster['router']}/metrics", headers={"Authorization": f"Bearer {keys.token}"})
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    assert 'kvrelay_auth_refused_total{plane="http",reason="a wrong bearer token"}' in text


@pytest.mark.timeout(400)
def test_forged_kv_transfer_params_are_refused(cluster, keys, other_keys):
    # the victim's prefill publishes its prompt's KV; its params name the victim's chunks
    status, victim = post(f"{cluster['prefill']}/v1/completions",
                          {"prompt": PROMPT, "max_tokens": 1, "request_id": "victim"}, keys.token)
    assert status == 200, victim
    stolen = victim["kv_transfer_params"]
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    decode = f"{cluster['decode']}/v1/completions"
    status, answer = post(decode, {**body, "request_id": "evil", "kv_transfer_params": stolen}, keys.token)
    assert status == 403 and "only from the router" in answer["error"]["message"], answer
    light = {"do_remote_prefill": True}  # the light form too
    status, answer = post(decode, {**body, "request_id": "victim", "kv_transfer_params": light}, keys.token)
    assert status == 403, answer
    for forged in (signed_params.sign(other_keys, stolen, "evil"),  # another cluster's secret
                   signed_params.sign(keys, stolen, "victim")):  # signed for another request
        status, answer = post(decode, {**body, "request_id": "evil", "kv_transfer_params": forged}, keys.token)
        assert status == 403 and "not signed" in answer["error"]["message"], answer
    # negative control: the same params, signed by a holder of the secret for this request, are served
    # (and pulled, not recomputed), so the refusals above are the signature's doing
    status, answer = post(decode, {**body, "request_id": "evil",
                                   "kv_transfer_params": signed_params.sign(keys, stolen, "evil")}, keys.token)
    assert status == 200 and "kvrelay" not in answer, answer
    # through the router a client's params are dropped: the request is served the normal way
    status, answer = post(f"{cluster['router']}/v1/completions",
                          {**body, "kv_transfer_params": stolen}, keys.token)
    assert status == 200, answer
    log = (Path(cluster["tmp"]) / "decode.log").read_text()
    assert "refused a peer on the params plane" in log
