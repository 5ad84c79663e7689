"""Hosts joining and leaving at run time through etcd, across network namespaces, with etcd on a namespace
address over TLS (client certificates from the key directory: `kvrelay keys DIR --etcd-host ADDR`).

Four namespace hosts: ``router`` (etcd on its address, https://, --client-cert-auth; and the router),
``sp`` (the store and a prefill), ``d1`` and ``d2`` (a decode each).  `kvrelay up -f cluster.yaml --host NAME`
starts router, sp and d1; the router follows etcd.  Then `kvrelay up --host d2` starts the second decode host
at run time: it must be in the router's pool within a few seconds of answering /healthz.  With requests
flowing, every process of host d1 is killed (SIGKILL: the host dies): d1 must leave the router's pool within
its lease (5 s), every request must either give the colocated engine's exact tokens or fail with a clear
error (none hangs), and d2 must serve the rest (its pulled-bytes counter grows).  A client in the root
namespace without the etcd client certificate is refused by etcd.

Needs root (`ip netns`) and etcd; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
import yaml
from etcd_helpers import EtcdProcess, etcd_binary
from waiting import wait_until

from kvrelay import proc
from kvrelay.bench import netns

WHY = netns.unavailable() or (None if etcd_binary() else "etcd is not installed (scripts/install-etcd.sh)")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(WHY is not None, reason=f"etcd across namespace hosts: {WHY}")]
HOSTS = ("router", "sp", "d1", "d2")
MODEL = "kvrelay-ref-8l-512-v32000-seed0"
PROMPT = list(range(11, 140))
START_S = 300.0
LEASE_S = 5.0  # the engines' --etcd-ttl default


def _get(url: str, token: str = "") -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def _readyz(router: str) -> dict:
    code, body = _get(router + "/readyz")
    return json.loads(body) if code in (200, 503) else {}


def _complete(url: str, token: str, timeout: float = 60.0) -> tuple[list[int] | None, str]:
    """The greedy answer's token ids, or None and the error (HTTP status and message, or the exception)."""
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0,
                       "return_token_ids": True}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", data=body, headers={
        "Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return list(json.loads(r.read())["choices"][0]["token_ids"]), ""
    except urllib.error.HTTPError as exc:
        return None, f"HTTP {exc.code}: {exc.read().decode()[:300]}"
    except OSError as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _pulled(url: str, token: str) -> float:
    code, text = _get(url + "/metrics", token)
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("kvrelay_engine_pulled_bytes_total")) if code == 200 else 0.0


def _kill_host(hosts: netns.Hosts, name: str) -> list[int]:
    """SIGKILL every process in host ``name``'s namespace (the host dies): their pids."""
    out = subprocess.run(["ip", "netns", "pids", hosts.ns[name]], capture_output=True, text=True, check=True)
    pids = [int(p) for p in out.stdout.split()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


@pytest.mark.timeout(900)
def test_decode_hosts_join_and_leave_through_etcd_over_tls(tmp_path):
    from kvrelay.membership import EtcdTLS
    from kvrelay.security import write_keys
    from kvrelay.security.etcdcerts import write_etcd_certs
    procs: list[proc.ChildProcess] = []
    with netns.Hosts(HOSTS, tag="e") as hosts:
        addr = {n: hosts.address(n) for n in HOSTS}
        keys = write_keys(tmp_path / "keys")
        write_etcd_certs(keys, [addr["router"]])
        token = (keys / "token").read_text().strip()
        etcd = EtcdProcess(tmp_path, keys=keys, host=addr["router"],
                           wrap=lambda argv: hosts.command("router", argv)).start()
        try:
            # a client without the certificate (trusting etcd's CA) is refused at the handshake
            no_cert = ssl.create_default_context(cafile=str(EtcdTLS.from_keys_dir(keys).ca))
            with pytest.raises(OSError):  # ssl.SSLError (an OSError), or the connection reset
                with urllib.request.urlopen(etcd.url + "/v3/kv/range", data=b'{"key": "AA=="}', timeout=5,
                                            context=no_cert) as r:
                    pytest.fail(f"etcd answered a client without a certificate: HTTP {r.status}")
            spec = {"transport": "tcp", "keys": str(keys), "etcd": etcd.url, "hosts": {
                "router": {"address": addr["router"], "router": {"port": 8000}},
                "sp": {"address": addr["sp"], "store": {"port": 5600, "pool_size": "256MiB"},
                       "prefill": [{"port": 8100, "threads": 1}]},
                "d1": {"address": addr["d1"], "decode": [{"port": 8200, "threads": 1}]},
                "d2": {"address": addr["d2"], "decode": [{"port": 8200, "threads": 1}]}}}
            cluster = tmp_path / "cluster.yaml"
            cluster.write_text(yaml.safe_dump(spec))

            def up(name: str) -> proc.ChildProcess:
                work = tmp_path / name
                work.mkdir()
                p = hosts.spawn(name, proc.kvrelay_argv(["up", "-f", str(cluster), "--host", name,
                                                         "--workdir", str(work)]), log=work / "up.log")
                procs.append(p)
                return p

            env = {k: v for k, v in os.environ.items() if k != "KVRELAY_KEYS"}
            colocated = proc.spawn_kvrelay(["engine", "--role", "colocated", "--port", "0", "--threads", "1"],
                                           name="colocated", log=tmp_path / "colocated.log",
                                           ready_file=tmp_path / "colocated.json", env=env)
            procs.append(colocated)
            for name in ("router", "sp", "d1"):
                up(name)
            router = f"http://{addr['router']}:8000"
            d1, d2 = f"http://{addr['d1']}:8200", f"http://{addr['d2']}:8200"

            def logs() -> str:
                return "\n".join(f"--- {f}\n{f.read_text()[-1500:]}" for f in sorted(tmp_path.rglob("*.log")))

            def started() -> bool:
                dead = [p.argv for p in procs if p.poll() is not None]
                if dead:
                    pytest.fail(f"exited: {dead}\n{logs()}")
                r = _readyz(router)
                return bool(r.get("prefill") and r.get("decode") == [d1] and (r.get("store") or {}).get("up"))
            wait_until(started, START_S, "the router with sp's prefill, d1's decode (from etcd) and the store",
                       detail=lambda: json.dumps(_readyz(router)), interval=0.2)
            expected, _ = _complete(colocated.wait_ready(START_S)["url"], "")
            assert expected is not None and len(expected) == 4
            assert _complete(router, token) == (expected, "")

            # a decode host started at run time: in the pool within a few seconds of answering /healthz
            t_spawn = time.monotonic()
            up("d2")
            wait_until(lambda: _get(d2 + "/healthz")[0] == 200, START_S, "d2's decode answering /healthz",
                       detail=logs, interval=0.05)
            t_healthy = time.monotonic()
            wait_until(lambda: sorted(_readyz(router).get("decode", [])) == [d1, d2], 5.0, "d2 in the router's decode pool",
                       detail=lambda: json.dumps(_readyz(router)), interval=0.05)
            print(f"d2 joined the router {time.monotonic() - t_healthy:.2f}s after answering /healthz "
                  f"({time.monotonic() - t_spawn:.2f}s after its `kvrelay up` started)")

            # requests flowing while host d1 dies
            outcomes: list[tuple[float, list[int] | None, str]] = []
            stop = threading.Event()

            def traffic() -> None:
                while not stop.is_set():
                    t0 = time.monotonic()
                    ids, err = _complete(router, token)
                    outcomes.append((time.monotonic() - t0, ids, err))
            sender = threading.Thread(target=traffic, daemon=True)
            sender.start()
            wait_until(lambda: len(outcomes) >= 3, 120, "requests flowing before the kill")
            before = _pulled(d2, token)
            pids = _kill_host(hosts, "d1")
            t_kill = time.monotonic()
            assert pids, "no process in d1's namespace"
            wait_until(lambda: [b["url"] for b in _readyz(router).get("breakers", {}).get("decode", [])] == [d2],
                       LEASE_S + 3, "d1 dropped from the router's pool within its lease",
                       detail=lambda: json.dumps(_readyz(router)), interval=0.05)
            print(f"d1 dropped {time.monotonic() - t_kill:.2f}s after SIGKILL (lease {LEASE_S:g}s)")
            n_at_drop = len(outcomes)
            wait_until(lambda: len(outcomes) >= n_at_drop + 5, 120, "requests after the drop")
            stop.set()
            sender.join(120)
            assert not sender.is_alive(), "a request hung"
            ok = [o for o in outcomes if o[1] is not None]
            failed = [o for o in outcomes if o[1] is None]
            print(f"{len(outcomes)} requests: {len(ok)} exact, {len(failed)} failed "
                  f"({[e for _, _, e in failed]}); slowest {max(t for t, _, _ in outcomes):.2f}s")
            assert all(ids == expected for _, ids, _ in ok), "a request gave other tokens than the colocated engine"
            assert all(t < 30 for t, _, _ in outcomes), "a request took 30 s or more"
            assert all(err.startswith("HTTP 5") and "message" in err for _, _, err in failed), failed
            assert all(ids is not None for _, ids, _ in outcomes[n_at_drop:]), "a request failed after d1 left"
            assert _pulled(d2, token) > before, "d2 served none of the requests after d1 died"
        finally:
            for p in procs:
                p.signal(signal.SIGTERM)
            for p in procs:
                p.stop(30)
            etcd.kill()
    for name in ("router", "sp", "d2"):
        assert "Traceback" not in (tmp_path / name / "up.log").read_text(), name
