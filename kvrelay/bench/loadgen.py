"""A streaming load generator for the router benchmark, run as its own process pinned to its own core.

    python -m kvrelay.bench.loadgen < spec.json > results.json     (or `load(...)`, which runs that)

The spec: ``{"urls": [...], "path": "/v1/completions", "concurrency": N, "bodies": [...], "core": C | null,
"timeout": seconds}`` (body i goes to ``urls[i % len(urls)]``).  Each body is sent once (``stream: true``)
by one of N concurrent loops sharing one aiohttp session without a connection cap; per request it records
the time to the first event, the total time, the generated text (the events' ``choices[0].text`` joined)
and whether the stream ended with ``data: [DONE]`` and no error event.  Results come back in the order of the bodies.

Owns: the client side of a load.  Must not touch: what is served (kvrelay.bench.router starts that).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import aiohttp


async def _one(session: aiohttp.ClientSession, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    first = None
    text: list[str] = []
    done = error = False
    status = 0
    try:
        async with session.post(url, json={**body, "stream": True}) as r:
            status = r.status
            buf = b""
            async for chunk in r.content.iter_any():
                if first is None:
                    first = time.perf_counter() - t0
                buf += chunk
                *events, buf = buf.split(b"\n\n")
                for ev in events:
                    data = ev.removeprefix(b"data: ")
                    if data == b"[DONE]":
                        done = True
                        continue
                    msg = json.loads(data)
                    if "error" in msg:
                        error = True
                    else:
                        text.append(msg["choices"][0].get("text") or msg["choices"][0].get("delta", {})
                                    .get("content") or "")
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError, KeyError, IndexError) as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "ttft": first, "total": time.perf_counter() - t0,
                "text": "".join(text), "status": status}
    ok = status == 200 and done and not error
    return {"ok": ok, "error": "" if ok else f"HTTP {status}, done={done}, error event={error}", "ttft": first,
            "total": time.perf_counter() - t0, "text": "".join(text), "status": status}


async def run(urls: list[str], bodies: list[dict], concurrency: int, timeout: float = 600.0) -> tuple[list[dict], float]:
    """(one result per body, wall seconds of the whole load)."""
    results: list[dict] = [{} for _ in bodies]
    queue = iter(enumerate(bodies))
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async def loop() -> None:
            for i, body in queue:
                results[i] = await _one(session, urls[i % len(urls)], body)
        t0 = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(max(1, concurrency))))
        return results, time.perf_counter() - t0


def load(urls: list[str], bodies: list[dict], concurrency: int, core: int | None = 0, timeout: float = 600.0) -> dict:
    """Run a load generator process (pinned to ``core``) and return its report; RuntimeError if it failed or if
    any request did not complete."""
    spec = {"urls": urls, "bodies": bodies, "concurrency": concurrency, "core": core, "timeout": timeout}
    out = subprocess.run([sys.executable, "-m", "kvrelay.bench.loadgen"], input=json.dumps(spec).encode(),
                         capture_output=True, timeout=timeout + 300)
    if out.returncode:
        raise RuntimeError(f"the load generator failed: {out.stderr.decode()[-2000:]}")
    res = json.loads(out.stdout)
    failed = [r for r in res["results"] if not r.get("ok")]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(bodies)} requests to {urls} failed, e.g. {failed[0]}")
    return res


def main() -> int:
    spec = json.load(sys.stdin)
    if spec.get("core") is not None:
        os.sched_setaffinity(0, {spec["core"]})
    try:
        import uvloop  # a cheaper client: the load generator must not be what limits the router
        uvloop.install()
    except ImportError:
        pass
    cpu0 = time.process_time()
    path = spec.get("path", "/v1/completions")
    results, wall = asyncio.run(run([u + path for u in spec["urls"]], spec["bodies"], spec["concurrency"],
                                    spec.get("timeout", 600.0)))
    json.dump({"results": results, "wall": wall, "cpu": time.process_time() - cpu0}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
