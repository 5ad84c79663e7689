"""etcd over TLS with client certificates from the key directory (`kvrelay keys DIR --etcd-host HOST`): a real
etcd started with --client-cert-auth on 127.0.0.1; members register and a view follows them over https with
the key directory's client certificate (found through $KVRELAY_KEYS, as every kvrelay process finds it), and
a client without a certificate, with one of another CA, or speaking plain http is refused.  Plain http:// to
an address off loopback is refused before anything is sent."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import stat
import subprocess
import sys

import pytest
from cryptography import x509

from etcd_helpers import EtcdProcess
from kvrelay.membership import EtcdClient, EtcdError, EtcdTLS, Member, MembershipView, Registration, check_endpoint
from kvrelay import status
from kvrelay.security import keygen, write_keys
from kvrelay.security.etcdcerts import write_etcd_certs
from waiting import await_until


@pytest.fixture
def keys(tmp_path):
    d = write_keys(tmp_path / "keys")
    write_etcd_certs(d, ["127.0.0.1", "localhost"])
    return d


def test_kvrelay_keys_writes_etcd_certificates(tmp_path, capsys):
    d = tmp_path / "k"
    assert keygen.main([str(d)]) == 0
    token = (d / "token").read_text()
    assert keygen.main([str(d), "--etcd-host", "198.18.0.1", "--etcd-host", "etcd.example"]) == 0
    out = capsys.readouterr().out
    assert "--client-cert-auth --trusted-ca-file" in out and "https://198.18.0.1:2379" in out
    assert (d / "token").read_text() == token  # the other keys are kept
    assert stat.S_IMODE((d / "etcd").stat().st_mode) == 0o700
    for name in ("ca", "server", "client"):
        for ext in ("crt", "key"):
            assert stat.S_IMODE((d / "etcd" / f"{name}.{ext}").stat().st_mode) == 0o600
    server = x509.load_pem_x509_certificate((d / "etcd" / "server.crt").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["198.18.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["etcd.example", "kvrelay-cluster"]
    assert keygen.main([str(d), "--etcd-host", "198.18.0.1"]) == 2
    assert "etcd certificates already exist; pass --force" in capsys.readouterr().err
    assert keygen.main([str(d), "--etcd-host", "https://198.18.0.1:2379"]) == 2
    assert "give an IP address or a DNS name" in capsys.readouterr().err
    assert keygen.main([str(d), "--etcd-host", "198.18.0.2", "--force"]) == 0
    assert (d / "token").read_text() == token


def test_endpoints_and_missing_certificates(tmp_path, monkeypatch):
    assert check_endpoint("https://198.18.0.1:2379/") == "https://198.18.0.1:2379"
    assert check_endpoint("http://localhost:2379") == "http://localhost:2379"
    with pytest.raises(ValueError, match="plain http:// to 198.18.0.1 is not on loopback"):
        check_endpoint("http://198.18.0.1:2379")
    with pytest.raises(ValueError, match=r"no etcd certificates .* `kvrelay keys .* --etcd-host ETCD-ADDRESS`"):
        EtcdTLS.from_keys_dir(write_keys(tmp_path / "plain"))
    monkeypatch.delenv("KVRELAY_KEYS", raising=False)

    async def main() -> None:
        client = EtcdClient("https://127.0.0.1:1")
        with pytest.raises(EtcdError, match=r"https:// etcd is reached with .* pass --keys DIR"):
            await client.range_prefix(b"/x/")
        assert not await client.health()
        await client.close()
    asyncio.run(main())


@pytest.mark.slow  # starts an etcd process
def test_members_register_and_are_followed_over_tls(tmp_path, keys, monkeypatch, capsys):
    server = EtcdProcess(tmp_path, keys=keys).start()
    monkeypatch.setenv("KVRELAY_KEYS", str(keys))  # what --keys DIR sets for the process
    try:
        assert server.url.startswith("https://127.0.0.1:")

        async def main() -> None:
            view = MembershipView(server.url, "tls", check_interval=1.0)
            view.start()
            reg = Registration(server.url, Member(kind="decode", name="d1", address="http://127.0.0.1:9", cluster="tls"),
                               ttl=3)
            reg.start()
            await await_until(lambda: [m.name for m in view.of_kind("decode")] == ["d1"], 10,
                                   "the view listing d1 over https")
            assert view.connected and await view.client.health()
            listed = await asyncio.to_thread(status.main, ["--etcd", server.url, "--cluster", "tls", "--json"])
            assert listed == 3  # kvrelay status --etcd https://...: d1 listed (its address answers nothing: down)
            assert [m["name"] for m in json.loads(capsys.readouterr().out)["members"]] == ["d1"]
            # the command line, in a process without $KVRELAY_KEYS: --keys DIR reaches it, nothing does not
            env = {k: v for k, v in os.environ.items() if k != "KVRELAY_KEYS"}
            argv = [sys.executable, "-m", "kvrelay.cli", "status", "--etcd", server.url, "--cluster", "tls", "--json"]
            with_keys = await asyncio.to_thread(subprocess.run, [*argv, "--keys", str(keys)], env=env,
                                                capture_output=True, text=True, timeout=60)
            assert with_keys.returncode == 3, with_keys.stderr
            assert [m["name"] for m in json.loads(with_keys.stdout)["members"]] == ["d1"]
            without = await asyncio.to_thread(subprocess.run, argv, env=env, capture_output=True, text=True,
                                              timeout=60)
            assert without.returncode == 1 and "pass --keys DIR" in without.stderr, without.stderr
            await reg.stop()  # revoked over https: gone at once
            await await_until(lambda: not view.members, 5, "d1 gone once revoked")
            await view.stop()
        asyncio.run(main())
    finally:
        server.kill()


@pytest.mark.slow  # starts an etcd process
def test_clients_without_the_certificate_are_refused(tmp_path, keys):
    server = EtcdProcess(tmp_path, keys=keys).start()
    try:
        other = write_keys(tmp_path / "other")
        write_etcd_certs(other, ["127.0.0.1"])
        theirs = EtcdTLS.from_keys_dir(other)
        ours = EtcdTLS.from_keys_dir(keys)
        no_cert = ssl.create_default_context(cafile=str(ours.ca))  # trusts etcd, presents nothing
        got = b""
        try:  # TLS 1.3: the handshake may finish on the client's side before etcd sends its alert
            with socket.create_connection(("127.0.0.1", server.client_port), timeout=5) as raw:
                with no_cert.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    tls.sendall(b'POST /v3/kv/range HTTP/1.1\r\nHost: x\r\nContent-Length: 14\r\n\r\n{"key":"AA=="}')
                    got = tls.recv(100)
        except (ssl.SSLError, OSError):
            pass
        assert got == b"", f"etcd answered a client without a certificate: {got!r}"

        async def main() -> None:
            # a certificate of another CA: refused by etcd (and etcd's certificate is not trusted by it)
            stranger = EtcdClient(server.url, timeout=3, tls=EtcdTLS(ours.ca, theirs.cert, theirs.key))
            with pytest.raises(EtcdError, match="did not answer /v3/kv/put"):
                await stranger.put(b"/tls/x", b"1")
            await stranger.close()
            plain = EtcdClient(server.url.replace("https://", "http://"), timeout=3)
            with pytest.raises(EtcdError):
                await plain.put(b"/tls/x", b"1")
            await plain.close()
            good = EtcdClient(server.url, tls=ours)
            kvs, _ = await good.range_prefix(b"/tls/")
            assert kvs == [], "a refused client wrote a key"
            await good.put(b"/tls/y", b"2")
            assert [kv.key for kv in (await good.range_prefix(b"/tls/"))[0]] == [b"/tls/y"]
            await good.close()
        asyncio.run(main())
    finally:
        server.kill()
