"""What the router needs to route by cache: the KV events it follows, and the prompt's token ids.

``--events NAME=PUB[,REPLAY]`` (repeatable): follow the KV-event publisher at PUB (replay socket REPLAY)
as NAME, a ``--prefill``/``--decode`` URL or ``store``; one `kvrelay.events.EventSubscriber` each (its
own thread: gaps are replayed, a restarted publisher resyncs), feeding one `KVIndex`.

Token ids: the router hashes the prompt the way the index names blocks (kvindex.py), so it needs the
prompt's token ids as the engine computes them.  A token-id prompt (vLLM's and the reference engine's
``prompt: [ids]``) is used as is; a text prompt or chat messages are tokenized as the reference engine
does (kvrelay.engines.reference.tokenizer: the checkpoint's tokenizer.json given by ``--tokenizer``, else
byte-level; chat through its template).  A prompt the router cannot read gets no tokens (routed without
cache credit; the engine reports the error).

Owns: `CacheView` (subscribers' lifetime, tokenizing).  Must not touch: the index's rules, routing.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from dataclasses import dataclass

from kvrelay.engines.reference.tokenizer import Tokenizer, apply_chat_template, load_tokenizer
from kvrelay.events.subscriber import EventSubscriber
from kvrelay.router.kvindex import KVIndex

BIG_VOCAB = 1 << 31  # the router checks no vocabulary: the engines do


@dataclass(frozen=True, slots=True)
class EventSource:
    name: str  # a worker URL or "store"
    endpoint: str
    replay: str | None


def parse_events(spec: str, names: set[str]) -> EventSource:
    """``NAME=tcp://HOST:PORT[,tcp://HOST:PORT]``; ValueError naming the problem."""
    name, sep, rest = spec.rpartition("=")
    example = "e.g. --events http://127.0.0.1:8100=tcp://127.0.0.1:5557,tcp://127.0.0.1:5558"
    if not sep or not name:
        raise ValueError(f"--events {spec!r}: give NAME=PUB[,REPLAY] ({example})")
    name = name.rstrip("/")
    if name not in names:
        raise ValueError(f"--events {spec!r}: {name!r} is neither a --prefill or --decode URL nor 'store'")
    parts = rest.split(",")
    if len(parts) > 2:
        raise ValueError(f"--events {spec!r}: at most two endpoints, the publisher and its replay socket")
    for ep in parts:
        try:
            u = urllib.parse.urlsplit(ep)
            port = u.port
        except ValueError as exc:
            raise ValueError(f"--events {spec!r}: {ep!r}: {exc}") from None
        if u.scheme != "tcp" or not u.hostname or not port:
            raise ValueError(f"--events {spec!r}: {ep!r} is not tcp://HOST:PORT ({example})")
    return EventSource(name, parts[0], parts[1] if len(parts) == 2 else None)


class CacheView:
    def __init__(self, sources: list[EventSource], tokenizer_dir: str | None = None) -> None:
        self.index = KVIndex()
        self.sources = sources
        self.tokenizer: Tokenizer = load_tokenizer(tokenizer_dir, BIG_VOCAB)
        self._subs: list[EventSubscriber] = []

    def start(self) -> None:
        for s in self.sources:
            self._subs.append(EventSubscriber(s.endpoint, s.replay, self._on_batch, on_resync=self.index.clear,
                                              source=s.name).start())

    def _on_batch(self, source: str, seq: int, batch) -> None:
        self.index.apply(source, batch)

    async def stop(self) -> None:
        subs, self._subs = self._subs, []
        await asyncio.gather(*(asyncio.to_thread(s.close) for s in subs))

    def tokens(self, path: str, body: dict) -> list[int] | None:
        """The prompt's token ids as the engine will see them; None if the router cannot tell."""
        try:
            if path.endswith("/chat/completions"):
                msgs = body.get("messages")
                if not isinstance(msgs, list) or not msgs:
                    return None
                return self.tokenizer.encode(apply_chat_template(msgs))
            p = body.get("prompt")
            if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
                p = p[0]  # a batch of one
            if isinstance(p, str):
                return self.tokenizer.encode(p)
            if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                return p
        except (ValueError, TypeError, AttributeError):
            return None
        return None
