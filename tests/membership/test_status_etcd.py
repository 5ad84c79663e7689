"""`kvrelay status --etcd URL`: the members etcd knows of a cluster, with their health; exit 0 when every one
answers, 3 when some do not, 1 when etcd does not answer, 2 on a bad flag."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading

import pytest

from kvrelay import status
from kvrelay.httpjson import free_port
from kvrelay.membership import EtcdClient, Member


class Healthy(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 -- http.server's name
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def put(url: str, *members: Member, delete: bytes = b"") -> None:
    async def main() -> None:
        client = EtcdClient(url)
        for m in members:
            await client.put(m.key, m.encode())
        if delete:
            await client.delete(delete)
        await client.close()
    asyncio.run(main())


@pytest.mark.slow  # starts an etcd process
def test_status_lists_members_and_their_health(etcd, capsys):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        up = Member(kind="prefill", name="p1", address=f"http://127.0.0.1:{server.server_port}", cluster="s",
                    attributes={"model": "m"})
        store = Member(kind="store", name="s1", address="tcp://127.0.0.1:5600", cluster="s")
        dead = Member(kind="decode", name="d1", address=f"http://127.0.0.1:{free_port()}", cluster="s")
        elsewhere = Member(kind="decode", name="x", address="http://127.0.0.1:1", cluster="other")
        put(etcd.url, up, store, dead, elsewhere)
        assert status.main(["--etcd", etcd.url, "--cluster", "s"]) == 3
        out = capsys.readouterr().out.splitlines()
        assert out[0] == f"cluster 's' in etcd {etcd.url}: 3 members"
        rows = {line.split()[1]: line.split() for line in out[2:]}
        assert rows["p1"][:3] == ["prefill", "p1", "ok"] and rows["p1"][4] == "model=m"
        assert rows["d1"][:3] == ["decode", "d1", "down"] and rows["s1"][:3] == ["store", "s1", "-"]
        put(etcd.url, delete=dead.key)
        assert status.main(["--etcd", etcd.url, "--cluster", "s", "--json"]) == 0
        listing = json.loads(capsys.readouterr().out)
        assert [(m["name"], m["health"]) for m in listing["members"]] == [("p1", "ok"), ("s1", "-")]
    finally:
        server.shutdown()


def test_status_etcd_errors(capsys):
    assert status.main(["--etcd", f"http://127.0.0.1:{free_port()}"]) == 1
    assert "did not answer /v3/kv/range" in capsys.readouterr().err
    assert status.main(["--etcd", "localhost:2379"]) == 2
    assert "--etcd 'localhost:2379': the scheme must be http://" in capsys.readouterr().err
