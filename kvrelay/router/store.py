"""The router's view of the stores: is each up?  While the store is down, requests skip the prefill leg;
with a store on every host (`PrefillStores`), a prefill whose store is down is passed over.

The router keeps one ZMQ DEALER on the store's control address (the one engines are given,
tcp://127.0.0.1:PORT) and pings it with the store protocol's anonymous `Ping`: every ``interval`` seconds
while it is up, every ``probe_interval`` while it is down.  The breaker opens when a ping is not answered
within ``timeout``, or at once when the store drops the connection (its process exited: a ZMQ monitor
reports it); the first answered ping closes it.  The DEALER reconnects by itself (every RECONNECT_MS), so
a restarted store answers the next probe.

With a store on every host (``--prefill-store URL=ADDR``: the store each prefill publishes into),
`PrefillStores` keeps one `StoreWatch` per store (a breaker each) and answers which store a prefill's
decode leg names (its params' ``store_address``: the decode pulls from it) and which prefills to pass over
while their store is down; a store that dies costs only the requests whose chunks it held.

Owns: `StoreWatch`, `PrefillStores`.  Must not touch: the store's state (it only pings) or engine code.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterable, Sequence

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from kvrelay import security
from kvrelay.router.breaker import Breaker
from kvrelay.store import protocol as P

log = logging.getLogger("kvrelay.router.store")
RECONNECT_MS = 50


class StoreWatch:
    def __init__(self, address: str, timeout: float = 1.0, interval: float = 2.0, probe_interval: float = 0.2) -> None:
        if not address.startswith("tcp://"):
            raise ValueError(f"--store {address!r}: give the store's control address, e.g. tcp://127.0.0.1:5600")
        if min(timeout, interval, probe_interval) <= 0:
            raise ValueError(f"store ping timeout {timeout}, interval {interval} and probe interval "
                             f"{probe_interval} must be positive (seconds)")
        self.address, self.timeout = address, timeout
        self.interval, self.probe_interval = interval, probe_interval
        self.breaker = Breaker(f"store {address}", threshold=1)
        self.pings = 0  # answered pings (a test counts them)
        self._ids = itertools.count(1)
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._lock = asyncio.Lock()  # one ping at a time on the socket
        self._wake = asyncio.Event()  # the store dropped the connection: ping now
        self._tasks: list[asyncio.Task] = []

    @property
    def up(self) -> bool:
        return self.breaker.available

    def _socket(self) -> zmq.asyncio.Socket:
        if self._sock is None:
            self._ctx = zmq.asyncio.Context()
            self._sock = self._ctx.socket(zmq.DEALER)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_MS)
            if (keys := security.current()) is not None:  # the store's CURVE (kvrelay.security)
                keys.client_socket(self._sock)
            self._sock.connect(self.address)
        return self._sock

    async def ping(self) -> None:
        """One ping; raises TimeoutError (no answer in time) or RuntimeError (an error answer)."""
        async with self._lock:
            sock = self._socket()
            req_id = next(self._ids)
            await sock.send(P.encode(P.Ping(req_id=req_id)))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.timeout
            while True:  # answers to earlier pings that timed out may come first: skipped
                left = deadline - loop.time()
                if left <= 0 or not await sock.poll(int(left * 1000) + 1):
                    raise TimeoutError(f"no answer to a ping within {self.timeout}s")
                rep = P.decode_reply(await sock.recv())
                if rep.req_id == req_id:
                    if not rep.ok:
                        raise RuntimeError(f"the store answered a ping with {rep.code}: {rep.error}")
                    self.pings += 1
                    return

    async def check(self) -> bool:
        """Ping once and update the breaker; True if the store answered."""
        try:
            await self.ping()
        except (TimeoutError, RuntimeError, ValueError, zmq.ZMQError) as exc:
            self.breaker.probe_failed(f"{type(exc).__name__}: {exc}")
            return False
        self.breaker.success()
        return True

    def start(self) -> None:
        mon = self._socket().get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._tasks = [asyncio.create_task(self._run()), asyncio.create_task(self._watch(mon))]

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            wait = self.interval if await self.check() else self.probe_interval
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except asyncio.TimeoutError:
                pass

    async def _watch(self, mon: zmq.asyncio.Socket) -> None:
        try:
            while True:
                event = parse_monitor_message(await mon.recv_multipart())
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    self.breaker.probe_failed("the store dropped its connection (exited or restarted)")
                    self._wake.set()
        finally:
            mon.close(linger=0)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = self._sock = None

    def state(self) -> dict:
        b = self.breaker
        return {"address": self.address, "up": self.up, "state": b.state.value, "opened": b.opened,
                "last_error": b.last_error}


def parse_prefill_stores(specs: Sequence[str], prefill: Iterable[str]) -> dict[str, str]:
    """``--prefill-store URL=ADDR`` flags as {prefill URL: store control address}; ValueError naming a bad one.
    Given at all, every ``--prefill`` needs one (its decode legs would otherwise name no store)."""
    urls = {u.rstrip("/") for u in prefill}
    out: dict[str, str] = {}
    for spec in specs:
        url, sep, address = spec.partition("=")
        url = url.rstrip("/")
        if not sep or not url or not address:
            raise ValueError(f"--prefill-store {spec!r}: give URL=ADDR, a --prefill URL and the control address of "
                             f"the store it publishes into, e.g. http://198.18.0.1:8100=tcp://198.18.0.1:5600")
        if url not in urls:
            raise ValueError(f"--prefill-store {spec!r}: {url} is not a --prefill URL")
        if not address.startswith("tcp://") or address.count(":") < 2:
            raise ValueError(f"--prefill-store {spec!r}: {address!r} is not a store's control address "
                             f"(tcp://HOST:PORT)")
        if url in out:
            raise ValueError(f"--prefill-store {spec!r}: {url} has a store already ({out[url]})")
        out[url] = address
    missing = sorted(urls - out.keys())
    if out and missing:
        raise ValueError(f"--prefill-store: no store for --prefill {', '.join(missing)}: give every prefill worker "
                         f"the store it publishes into")
    return out


class PrefillStores:
    """The store of each prefill worker (a store on every host), each watched by its own `StoreWatch`."""

    def __init__(self, stores: dict[str, str], **watch: float) -> None:
        """``stores``: {prefill URL: store address}; ``watch``: each StoreWatch's timeout and intervals."""
        self.of_url = {u.rstrip("/"): a for u, a in stores.items()}
        self.watches = {a: StoreWatch(a, **watch) for a in sorted(set(self.of_url.values()))}

    @classmethod
    def of(cls, specs: Sequence[str], prefill: Iterable[str], interval: float, probe_interval: float
           ) -> "PrefillStores | None":
        """The stores of ``--prefill-store`` flags (None: none given, one store or none for the cluster)."""
        stores = parse_prefill_stores(specs, prefill)
        return cls(stores, interval=interval, probe_interval=probe_interval) if stores else None

    def address_of(self, url: str) -> str | None:
        """The store prefill ``url`` publishes into (None: one not configured, e.g. joined at run time)."""
        return self.of_url.get(url.rstrip("/"))

    def up(self, url: str) -> bool:
        """Whether prefill ``url``'s store answers (a prefill with no known store: True)."""
        address = self.address_of(url)
        return address is None or self.watches[address].up

    def passed_over(self, urls: Iterable[str]) -> set[str]:
        """Those of ``urls`` whose store is down: no request is sent to them until it answers again."""
        return {u for u in urls if not self.up(u)}

    def others(self, url: str, urls: Iterable[str]) -> set[str]:
        """Those of ``urls`` that publish into another store than prefill ``url`` (a retry of its leg must not
        go there: the decode pulls from ``url``'s store)."""
        address = self.address_of(url)
        return {u for u in urls if self.address_of(u) != address}

    async def check(self) -> None:
        await asyncio.gather(*(w.check() for w in self.watches.values()))

    def start(self) -> None:
        for w in self.watches.values():
            w.start()

    async def stop(self) -> None:
        for w in self.watches.values():
            await w.stop()

    def state(self) -> list[dict]:
        return [{**w.state(), "prefill": sorted(u for u, a in self.of_url.items() if a == address)}
                for address, w in self.watches.items()]
