"""What the router needs to route by cache: the KV events it follows, and the prompt's token ids.

``--events NAME=PUB[,REPLAY]`` (repeatable): follow the KV-event publisher at PUB (replay socket REPLAY)
as NAME, a ``--prefill``/``--decode`` URL, ``store`` (one store), or with a store on every host a store's
control address (``tcp://HOST:PORT``: the name the engines and the hints use, policy.py); one `kvrelay.events.EventSubscriber` each (its
own thread: gaps are replayed, a restarted publisher resyncs), feeding one `KVIndex`.

Token ids: the router hashes the prompt the way the index names blocks (kvindex.py), so it needs the
prompt's token ids as the engine computes them: tokenize.py asks the workers that tokenize for others
(vLLM's /tokenize, with its checkpoint's chat template), else tokenizes as the reference engine does
(kvrelay.tokenizer: the checkpoint's tokenizer.json given by ``--tokenizer``, else byte-level).

Owns: `CacheView` (subscribers' lifetime, the prompt tokens' source).  Must not touch: the index's rules,
routing.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from kvrelay.events.subscriber import EventSubscriber
from kvrelay.router.kvindex import KVIndex
from kvrelay.router.tokenize import PromptTokens
from kvrelay.tokenizer import Tokenizer, load_tokenizer

BIG_VOCAB = 1 << 31  # the router checks no vocabulary: the engines do


@dataclass(frozen=True, slots=True)
class EventSource:
    name: str  # a worker URL or "store"
    endpoint: str
    replay: str | None


def parse_events(spec: str, names: set[str]) -> EventSource:
    """``NAME=tcp://HOST:PORT[,tcp://HOST:PORT]`` (or ``ipc://PATH``: a vLLM server's publisher binds only ipc://
    or tcp://*); ValueError naming the problem."""
    name, sep, rest = spec.rpartition("=")
    example = "e.g. --events http://127.0.0.1:8100=tcp://127.0.0.1:5557,tcp://127.0.0.1:5558"
    if not sep or not name:
        raise ValueError(f"--events {spec!r}: give NAME=PUB[,REPLAY] ({example})")
    name = name.rstrip("/")
    if name not in names and not _store_address(name):
        raise ValueError(f"--events {spec!r}: {name!r} is neither a --prefill or --decode URL nor 'store' (nor, "
                         f"with a store on every host, a store's control address tcp://HOST:PORT)")
    parts = rest.split(",")
    if len(parts) > 2:
        raise ValueError(f"--events {spec!r}: at most two endpoints, the publisher and its replay socket")
    for ep in parts:
        if ep.startswith("ipc://") and len(ep) > 6:
            continue
        try:
            u = urllib.parse.urlsplit(ep)
            port = u.port
        except ValueError as exc:
            raise ValueError(f"--events {spec!r}: {ep!r}: {exc}") from None
        if u.scheme != "tcp" or not u.hostname or not port:
            raise ValueError(f"--events {spec!r}: {ep!r} is not tcp://HOST:PORT or ipc://PATH ({example})")
    return EventSource(name, parts[0], parts[1] if len(parts) == 2 else None)


def _store_address(name: str) -> bool:
    try:
        u = urllib.parse.urlsplit(name)
        return u.scheme == "tcp" and bool(u.hostname) and bool(u.port) and u.path == ""
    except ValueError:
        return False


class CacheView:
    def __init__(self, sources: list[EventSource], tokenizer_dir: str | None = None,
                 tokenize_deadline_s: float = 0.1) -> None:
        """``tokenize_deadline_s``: how long a request waits for a worker's /tokenize before the router
        tokenizes it itself (tokenize.py)."""
        self.index = KVIndex()
        self.sources = sources
        self.tokenizer: Tokenizer = load_tokenizer(tokenizer_dir, BIG_VOCAB)
        self.prompts = PromptTokens(self.tokenizer, deadline_s=tokenize_deadline_s)
        self._subs: list[EventSubscriber] = []

    def start(self) -> None:
        for s in self.sources:
            self._subs.append(EventSubscriber(s.endpoint, s.replay, self._on_batch, on_resync=self.index.clear,
                                              source=s.name).start())

    def _on_batch(self, source: str, seq: int, batch) -> None:
        self.index.apply(source, batch)

    async def stop(self) -> None:
        subs, self._subs = self._subs, []
        await asyncio.gather(self.prompts.close(), *(asyncio.to_thread(s.close) for s in subs))

    async def tokens(self, path: str, body: dict, workers: Sequence[str] = (),
                     session: aiohttp.ClientSession | None = None) -> list[int] | None:
        """The prompt's token ids as the engine will see them (``workers``: URLs that may tokenize it, asked
        through ``session``); None if the router cannot tell (routed without cache credit)."""
        return await self.prompts.tokens(path, body, workers, session)
