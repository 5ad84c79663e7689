"""kvrelay behind NVIDIA Dynamo across network-namespace hosts, on Dynamo's etcd discovery.

Three hosts: ``front`` (etcd on its namespace address over https with --client-cert-auth, Dynamo's frontend),
``p`` (a kvrelay store and a prefill `kvrelay dynamo-worker`), ``d`` (a decode worker).  Every host runs its
own event broker on loopback.  The key directory's certificates (`kvrelay keys DIR --etcd-host FRONT`)
authenticate everything that leaves loopback: etcd (ETCD_AUTH_*), Dynamo's TCP request plane and response
streams (mutual TLS, DYN_TCP_TLS_*: each worker's request plane binds its host's address, the frontend's
response streams its own), the store (CURVE).  The frontend's HTTP stays on its host's loopback; the test
asks it from inside that namespace.  The greedy output must equal a colocated engine's, the decode must
have pulled the prompt's KV across hosts from p's store, both workers must be in etcd under Dynamo's keys,
and a client without a certificate must be refused by a worker's request plane.

Needs root (`ip netns`), etcd and ai-dynamo; skipped with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from etcd_helpers import EtcdProcess, etcd_binary
from waiting import wait_until

from kvrelay import proc
from kvrelay.bench import netns

WHY = netns.unavailable() or (None if etcd_binary() else "etcd is not installed (scripts/install-etcd.sh)")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(WHY is not None, reason=f"Dynamo across namespace hosts: {WHY}")]
HOSTS = ("front", "p", "d")
ROOT = Path(__file__).resolve().parents[2]
BROKER = ("5611", "5612")
ASK = r'''
import json, sys, urllib.request
port, messages, max_tokens = int(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
body = {"model": "kvrelay-test", "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
        "nvext": {"extra_fields": ["completion_token_ids"]}}
req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=120) as r:
        print(json.dumps(json.loads(r.read())["nvext"]["completion_token_ids"]))
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
'''


def _handshake(target: tuple[str, int], ca: str, cert: tuple[str, str] | None) -> str:
    """What a TLS client (trusting ``ca``, presenting ``cert``) gets from ``target`` after sending a few bytes:
    the SSL error's text, or 'answered'/'closed'."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = False
    if cert is not None:
        ctx.load_cert_chain(*cert)
    try:
        with socket.create_connection(target, timeout=5) as raw:
            with ctx.wrap_socket(raw) as tls:
                tls.sendall(b"\0" * 64)
                return "answered" if tls.recv(64) else "closed"
    except ssl.SSLError as exc:
        return str(exc)
    except OSError as exc:
        return f"closed ({exc})"


@pytest.mark.timeout(600)
def test_pd_behind_dynamo_on_etcd_across_hosts(tmp_path):
    pytest.importorskip("dynamo.common.backend", reason="NVIDIA Dynamo is not installed (pip install "
                        "ai-dynamo-runtime==1.6.1 && pip install --no-deps ai-dynamo==1.6.1)")
    from dynamo_helpers import MAX_TOKENS, pd_checkpoint
    from test_dynamo_pd import PROMPT_A, colocated

    from kvrelay.engines.dynamo.env import broker_url
    from kvrelay.membership import EtcdClient, EtcdTLS
    from kvrelay.security import write_keys
    from kvrelay.security.etcdcerts import write_etcd_certs

    procs: list[proc.ChildProcess] = []
    ck = pd_checkpoint(tmp_path / "ck", "kvrelay-dynamo-hosts-test")
    ask = tmp_path / "ask.py"
    ask.write_text(ASK)
    with netns.Hosts(HOSTS, tag="y") as hosts:
        addr = {n: hosts.address(n) for n in HOSTS}
        keys = write_keys(tmp_path / "keys")
        write_etcd_certs(keys, [addr["front"]])
        etcd = EtcdProcess(tmp_path, keys=keys, host=addr["front"],
                           wrap=lambda argv: hosts.command("front", argv)).start()
        env = {k: v for k, v in os.environ.items() if k != "KVRELAY_KEYS"} | {
            "PYTHONPATH": str(ROOT), "KVRELAY_LOG_LEVEL": "WARNING"}
        keyed = env | {"KVRELAY_KEYS": str(keys)}

        def spawn(host: str, name: str, args: list[str], **kw) -> proc.ChildProcess:
            child = proc.spawn(hosts.command(host, proc.kvrelay_argv(args)), name=name, log=tmp_path / f"{name}.log",
                               env=keyed, cwd=ROOT, session=True, **kw)  # Dynamo's workers start children: a group each
            procs.append(child)
            return child

        def logs() -> str:
            return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-1500:]}"
                             for f in sorted(tmp_path.glob("*.log")))

        try:
            colo = proc.spawn_kvrelay(["engine", "--role", "colocated", "--checkpoint", str(ck), "--port", "0",
                                       "--threads", "1"], name="colocated", log=tmp_path / "colocated.log",
                                      ready_file=tmp_path / "colo.json", env=env, cwd=ROOT)
            procs.append(colo)
            for h in HOSTS:
                spawn(h, f"broker-{h}", ["dynamo-broker", "--xsub-port", BROKER[0], "--xpub-port", BROKER[1]])
            store = spawn("p", "store", ["store", "--host", addr["p"], "--port", "5600", "--metrics-port", "0",
                                         "--pool-size", "256MiB", "--pool-name", f"kvrelay-dynhosts-{os.getpid()}",
                                         "--ssd-dir", "", "--transports", "shm,tcp", "--ready-file", str(tmp_path / "store.json")],
                          ready_file=tmp_path / "store.json")
            store_address = store.wait_ready(60)["address"]
            assert addr["p"] in store_address
            common = ["--checkpoint", str(ck), "--served-model-name", "kvrelay-test", "--etcd", etcd.url,
                      "--event-broker", broker_url(int(BROKER[0]), int(BROKER[1])), "--store", store_address,
                      "--threads", "1"]
            spawn("p", "prefill", ["dynamo-worker", "--role", "prefill", "--advertise-host", addr["p"],
                                   "--metrics-port", "9101", *common])
            spawn("d", "decode", ["dynamo-worker", "--role", "decode", "--advertise-host", addr["d"],
                                  "--metrics-port", "9102", "--transport", "tcp", *common])
            spawn("front", "frontend", ["dynamo-frontend", "--etcd", etcd.url, "--event-broker",
                                        broker_url(int(BROKER[0]), int(BROKER[1])), "--http-port", "8000",
                                        "--advertise-host", addr["front"]])

            def ask_front(messages: list[dict], max_tokens: int = MAX_TOKENS) -> list[int] | dict:
                out = subprocess.run(hosts.command("front", [sys.executable, str(ask), "8000", json.dumps(messages),
                                                             str(max_tokens)]), capture_output=True, text=True,
                                     timeout=180)
                return json.loads(out.stdout or '{"error": "no output"}')

            def pulled() -> float:
                out = subprocess.run(hosts.command("d", ["curl", "-s", "http://127.0.0.1:9102/metrics"]),
                                     capture_output=True, text=True, timeout=30).stdout
                return sum(float(line.split()[-1]) for line in out.splitlines()
                           if line.startswith("kvrelay_engine_pulled_bytes_total"))

            last: dict = {}

            def served() -> bool:
                dead = [p.name for p in procs if p.poll() is not None]
                if dead:
                    pytest.fail(f"exited: {dead}\n{logs()}")
                last["answer"] = ask_front([{"role": "user", "content": "warm up"}], 1)
                return isinstance(last["answer"], list) and pulled() > 0
            t0 = time.monotonic()
            wait_until(served, 300, "P/D through Dynamo's frontend across hosts",
                       detail=lambda: f"{last}\n{logs()}", interval=1.0)
            print(f"served across hosts {time.monotonic() - t0:.1f}s after the workers started")
            before = pulled()
            ids = ask_front(PROMPT_A)
            expected, _ = colocated(colo.wait_ready(120)["url"], PROMPT_A)
            assert ids == expected, f"P/D behind Dynamo across hosts differs from the colocated engine: {ids}"
            assert pulled() > before, "the decode pulled no KV from p's store"

            async def instances() -> list[tuple[bytes, bytes]]:
                client = EtcdClient(etcd.url, tls=EtcdTLS.from_keys_dir(keys))
                try:
                    return [(kv.key, kv.value) for kv in (await client.range_prefix(b"v1/instances/"))[0]]
                finally:
                    await client.close()
            found = asyncio.run(instances())
            assert {k.split(b"/")[3] for k, _ in found} == {b"kvrelay-prefill", b"kvrelay-decode"}, found
            # the prefill's request plane, on p's address, refuses a client without a certificate
            listed = re.search(rf"{re.escape(addr['p'])}:(\d+)".encode(), b" ".join(v for _, v in found))
            assert listed, f"no request-plane address of p in etcd: {found}"
            target = (addr["p"], int(listed.group(1)))
            ca = str(keys / "etcd" / "ca.crt")
            refused = _handshake(target, ca, None)
            assert "CERTIFICATE_REQUIRED" in refused, f"p's request plane took a client without a certificate: {refused}"
            with_cert = _handshake(target, ca, (str(keys / "etcd" / "client.crt"), str(keys / "etcd" / "client.key")))
            assert "CERTIFICATE" not in with_cert, with_cert  # the control: the cluster's client certificate passes
            print(f"p's request plane {target}: without a certificate {refused!r}; with the cluster's {with_cert!r}")
        finally:
            for p in procs:
                if p.alive():
                    p.signal(signal.SIGTERM, group=p is not colo)
            deadline = time.monotonic() + 30
            for p in procs:
                p.stop(max(0.1, deadline - time.monotonic()), group=p is not colo)
            etcd.kill()
