"""A small asyncio client of etcd's v3 API through its JSON gateway (HTTP POST on the client port).

Why the gateway and not a Python etcd library: the ones on PyPI (etcd3 0.12, last released 2020, and its
forks) generate their gRPC stubs against protobuf 3 and fail to import beside current protobuf, or are
unmaintained; the gateway is part of etcd itself (``/v3/kv/range``, ``/v3/kv/put``, ``/v3/lease/*``,
``/v3/watch``; keys and values base64, 64-bit numbers as strings) and needs only aiohttp, which kvrelay
already depends on.  An etcd off loopback is reached over https with the key directory's client certificate
(tls.py).

Owns: the requests and the parsing of their answers (`KeyValue`, `WatchEvent`), one `EtcdError` for every
failure (etcd not answering, an error answer), and the prefix arithmetic of a range.  Must not touch: what
the keys mean (member.py) or when to retry (registration.py, view.py).  Imports nothing of kvrelay but tls.py.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from kvrelay.membership.tls import EtcdTLS

__all__ = ["EtcdClient", "EtcdError", "KeyValue", "WatchEvent", "check_endpoint", "prefix_end"]


class EtcdError(RuntimeError):
    """etcd did not answer, or answered with an error (the message names the endpoint and the request)."""


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int
    lease: int


@dataclass(frozen=True, slots=True)
class WatchEvent:
    deleted: bool  # a DELETE (the key's lease expired, or it was deleted); else a PUT
    kv: KeyValue


def check_endpoint(url: str, flag: str = "--etcd") -> str:
    """``url`` without a trailing slash if it is http://HOST:PORT on loopback or https://HOST:PORT (etcd with
    client certificates: tls.py); else ValueError naming ``flag``."""
    hint = "give http://127.0.0.1:PORT (loopback) or https://HOST:PORT (TLS: `kvrelay keys DIR --etcd-host HOST`)"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{flag} {url!r}: {exc}; {hint}") from None
    why = ""
    if parts.scheme not in ("http", "https"):
        why = "the scheme must be http:// or https://"
    elif not parts.hostname:
        why = "no host"
    elif not port:
        why = "no port"
    elif parts.path not in ("", "/") or parts.query or parts.fragment or parts.username is not None:
        why = "nothing may follow host:port"
    elif parts.scheme == "http" and not _loopback(parts.hostname):
        why = (f"plain http:// to {parts.hostname} is not on loopback: etcd on another address must serve TLS with "
               f"client certificates (https://)")
    if why:
        raise ValueError(f"{flag} {url!r}: {why}; {hint}")
    return url.rstrip("/")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def prefix_end(prefix: bytes) -> bytes:
    """The range end that makes [prefix, end) every key starting with ``prefix``."""
    b = bytearray(prefix)
    while b and b[-1] == 0xFF:
        b.pop()
    if not b:
        return b"\0"  # every key
    b[-1] += 1
    return bytes(b)


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _kv(d: dict[str, Any]) -> KeyValue:
    return KeyValue(base64.b64decode(d.get("key", "")), base64.b64decode(d.get("value", "")),
                    int(d.get("mod_revision", 0)), int(d.get("lease", 0)))


class EtcdClient:
    """Requests to one etcd endpoint (``http://HOST:PORT`` on loopback, or ``https://HOST:PORT`` reached with
    ``tls``, by default the key directory's etcd client certificate) over an aiohttp session it owns
    (``close()``).  Missing certificates fail each request with an EtcdError that says how to write them."""

    def __init__(self, endpoint: str, timeout: float = 2.0, tls: EtcdTLS | None = None) -> None:
        self.endpoint = check_endpoint(endpoint, "etcd endpoint")
        self.timeout = timeout
        self.tls = tls
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = None
            if self.endpoint.startswith("https://"):
                try:
                    ctx = (self.tls or EtcdTLS.from_env()).ssl_context()
                except ValueError as exc:
                    raise EtcdError(f"etcd at {self.endpoint}: {exc}") from None
                connector = aiohttp.TCPConnector(ssl=ctx)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = self.endpoint + path
        try:
            async with self.session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=self.timeout)) as r:
                text = await r.text()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise EtcdError(f"etcd at {self.endpoint} did not answer {path}: {type(exc).__name__}: {exc}") from None
        try:
            answer = json.loads(text)
        except ValueError:
            raise EtcdError(f"etcd at {self.endpoint} answered {path} with HTTP {r.status}: {text[:200]!r}") from None
        if r.status != 200 or not isinstance(answer, dict) or "error" in answer:
            raise EtcdError(f"etcd at {self.endpoint} refused {path} (HTTP {r.status}): {text[:300]}")
        return answer

    async def health(self) -> bool:
        try:
            async with self.session.get(self.endpoint + "/health",
                                        timeout=aiohttp.ClientTimeout(total=self.timeout)) as r:
                return r.status == 200 and json.loads(await r.text()).get("health") == "true"  # text/plain
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, EtcdError):
            return False

    async def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds: its id."""
        return int((await self._post("/v3/lease/grant", {"TTL": ttl}))["ID"])

    async def keepalive(self, lease: int) -> int:
        """Renew ``lease``: its TTL now, 0 when etcd no longer knows it (expired or revoked)."""
        answer = await self._post("/v3/lease/keepalive", {"ID": str(lease)})
        return int(answer.get("result", {}).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        await self._post("/v3/lease/revoke", {"ID": str(lease)})

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        """Put ``key``; the store's revision after it."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int((await self._post("/v3/kv/put", body))["header"]["revision"])

    async def delete(self, key: bytes) -> None:
        await self._post("/v3/kv/deleterange", {"key": _b64(key)})

    async def range_prefix(self, prefix: bytes) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix`` and the revision the answer holds at."""
        answer = await self._post("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))})
        return [_kv(kv) for kv in answer.get("kvs", [])], int(answer["header"]["revision"])

    async def watch_prefix(self, prefix: bytes, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """The changes under ``prefix`` from ``start_revision`` on, a batch per etcd answer, until the
        stream breaks (EtcdError: etcd went away, or compacted past ``start_revision``)."""
        body = {"create_request": {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix)),
                                   "start_revision": str(start_revision)}}
        url = self.endpoint + "/v3/watch"
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout)
        try:
            async with self.session.post(url, json=body, timeout=timeout) as r:
                if r.status != 200:
                    raise EtcdError(f"etcd at {self.endpoint} refused the watch (HTTP {r.status})")
                buf = b""
                async for chunk in r.content.iter_any():
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        if line.strip():
                            events = _watch_events(self.endpoint, line)
                            if events:
                                yield events
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise EtcdError(f"etcd at {self.endpoint}: the watch broke: {type(exc).__name__}: {exc}") from None
        raise EtcdError(f"etcd at {self.endpoint} closed the watch")


def _watch_events(endpoint: str, line: bytes) -> list[WatchEvent]:
    try:
        answer = json.loads(line)
    except ValueError:
        raise EtcdError(f"etcd at {endpoint} sent a watch line that is not JSON: {line[:200]!r}") from None
    if "error" in answer:
        raise EtcdError(f"etcd at {endpoint} ended the watch: {answer['error']}")
    result = answer.get("result", {})
    if result.get("canceled") or int(result.get("compact_revision", 0)):
        raise EtcdError(f"etcd at {endpoint} cancelled the watch (compacted to revision "
                        f"{result.get('compact_revision', '?')}): {result.get('cancel_reason', '')}")
    return [WatchEvent(e.get("type") == "DELETE", _kv(e.get("kv", {}))) for e in result.get("events", [])]
