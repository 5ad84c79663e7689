"""The load a fault scenario runs under: streaming requests through the router with the official openai
client, each answer checked against the colocated engine's.

Owns: `Load` (the prompts, their expected answers, one request's `Outcome`, a round at a concurrency) and
`reference` (the colocated engine's greedy answer).  Must not touch: the faults or the cluster's processes.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

from kvrelay.bench.faults.cluster import UpCluster, post
from kvrelay.bench.faults.figures import Outcome

MAX_TOKENS = 12
VOCAB_LO, VOCAB_HI = 16, 1000  # inside every reference model's vocabulary
CLIENT_TIMEOUT = 90.0  # a request not answered by then is "hung"


def reference(cluster: UpCluster, prompt: list[int]) -> list[int]:
    """The colocated engine's greedy answer."""
    body = {"model": cluster.model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True}
    return post(f"{cluster.colocated}/v1/completions", body)["choices"][0]["token_ids"]


def random_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB_LO, VOCAB_HI) for _ in range(n)]


class Load:
    """Streaming requests through the router with the official openai client, checked against the colocated
    engine's answers (computed first, non-streaming)."""

    def __init__(self, cluster: UpCluster, n: int, seed: int, lengths: tuple[int, ...] = (40, 200, 600, 1100)):
        rng = random.Random(seed)
        self.cluster = cluster
        self.prompts = [random_prompt(rng, lengths[i % len(lengths)]) for i in range(n)]
        self.expected = [reference(cluster, p) for p in self.prompts]
        self.started = 0
        self.streaming = 0  # requests that received their first token
        self._lock = threading.Lock()

    def one(self, i: int, disconnect_after: int = 0) -> Outcome:
        import openai
        client = openai.OpenAI(base_url=f"{self.cluster.router}/v1", api_key="unused", timeout=CLIENT_TIMEOUT,
                               max_retries=0)
        t0 = time.monotonic()
        got: list[int] = []
        with self._lock:
            self.started += 1
        try:
            stream = client.completions.create(model=self.cluster.model, prompt=self.prompts[i],
                                               max_tokens=MAX_TOKENS, temperature=0.0, stream=True,
                                               extra_body={"ignore_eos": True, "return_token_ids": True})
            for chunk in stream:
                ids = (chunk.choices[0].model_extra or {}).get("token_ids") or [] if chunk.choices else []
                if ids and not got:
                    with self._lock:
                        self.streaming += 1
                got += ids
                if disconnect_after and len(got) >= disconnect_after:
                    stream.close()  # the client goes away mid-stream
                    return _ended("correct" if got == self.expected[i][:len(got)] else "wrong", "disconnected", t0)
        except openai.APITimeoutError as exc:
            return _ended("hung", str(exc), t0)
        except openai.APIError as exc:
            return _ended("clear_error", f"{type(exc).__name__}: {exc}"[:300], t0)
        kind = "correct" if got == self.expected[i] else "wrong"
        return _ended(kind, "" if kind == "correct" else f"got {got} want {self.expected[i]}", t0)

    def leave_early(self, i: int, after_s: float) -> Outcome:
        """Send request ``i`` (streaming) and close the connection ``after_s`` seconds later, whatever came by
        then: a client that goes away during the prefill leg.  Its answer so far is checked like any other
        (the tokens that came, if any, must begin the expected answer; an HTTP error is a clear error)."""
        u = urllib.parse.urlsplit(self.cluster.router)
        body = json.dumps({"model": self.cluster.model, "prompt": self.prompts[i], "max_tokens": MAX_TOKENS,
                           "temperature": 0.0, "stream": True, "ignore_eos": True, "return_token_ids": True}).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        t0 = time.monotonic()
        with self._lock:
            self.started += 1
        got = b""
        try:
            with socket.create_connection((u.hostname or "127.0.0.1", u.port or 80), timeout=CLIENT_TIMEOUT) as s:
                s.sendall(head + body)
                leave = t0 + after_s
                while (left := leave - time.monotonic()) > 0:  # read what comes until it is time to leave
                    s.settimeout(left)
                    try:
                        data = s.recv(65536)
                    except TimeoutError:
                        break
                    if not data:
                        break
                    got += data
        except OSError as exc:
            return _ended("clear_error", f"{type(exc).__name__}: {exc}"[:300], t0)
        status = got.split(b" ", 2)[1] if got.startswith(b"HTTP/") else b""
        if status and status != b"200":
            return _ended("clear_error", got.split(b"\r\n", 1)[0].decode(errors="replace"), t0)
        ids = [t for line in got.split(b"\n") for t in _event_tokens(line)]
        if ids:
            with self._lock:
                self.streaming += 1
        return _ended("correct" if ids == self.expected[i][:len(ids)] else "wrong", "disconnected", t0)

    def run(self, concurrency: int, disconnect_after: int = 0, leave_after_s: float = 0.0) -> list[Outcome]:
        """Every request at ``concurrency`` at a time; with ``disconnect_after`` each client closes its stream
        after that many tokens, and with ``leave_after_s`` every other one (the odd ones) leaves that many
        seconds after sending instead (`leave_early`)."""
        def one(i: int) -> Outcome:
            if leave_after_s and i % 2:
                return self.leave_early(i, leave_after_s)
            return self.one(i, disconnect_after)
        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(one, range(len(self.prompts))))


def _event_tokens(line: bytes) -> list[int]:
    """The token ids of one server-sent event line of a completion stream ([] for anything else, and for an
    event cut off when the client left)."""
    if not line.startswith(b"data: {"):
        return []
    try:
        event = json.loads(line[6:])
    except ValueError:
        return []
    return [t for c in event.get("choices") or [] for t in c.get("token_ids") or []]


def _ended(kind: str, detail: str, t0: float) -> Outcome:
    now = time.monotonic()
    return Outcome(kind, detail, now - t0, ended=now)
