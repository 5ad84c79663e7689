"""`kvrelay bench pd`: time to first token of prefill/decode against the prefill compute alone.

Owns: the pd suite only.  Must not touch: the harness or other suites.

Per transport (shm, tcp, nixl: the STORE_TRANSPORTS that `available_transports()` offers here)
and prompt length (>= 1,000 tokens), in one process on a real `kvrelay store` daemon:
  prefill        the reference engine's forward pass over the prompt alone (colocated, max_tokens=1)
  pd/layerwise   decode leg sent first (router-style params, first token unknown), then the prefill
                 publishes each layer while computing the next; TTFT = until the decode holds every layer
                 and the first token
  pd/after       the same with layer-wise publishing off: the whole request moves after the forward pass
                 (what other KV layers do for P/D)
Derived, per run (robust to the forward pass's run-to-run noise): exposed transfer = TTFT - the forward
pass of the same run (what the decode still waits for once the prefill has computed); overhead_pct =
exposed / prefill alone (target: <= 10% with layer-wise on); hidden fraction = 1 - exposed(layerwise) /
exposed(after), the share of the whole transfer that overlapped with compute.
Every prompt is fresh (no prefix-cache or store hits).  On 2 shared cores the publisher, the puller and
the store compete with the forward pass for CPU: numbers are noisy, report the conditions.
"""

from __future__ import annotations

import threading
import time
import uuid

import torch

from kvrelay.bench.harness import BenchContext, Record, median
from kvrelay.connector import transfer_params
from kvrelay.engines.reference.config import EngineConfig, ModelConfig
from kvrelay.engines.reference.engine import Engine
from kvrelay.engines.reference.kv_connector import make_hooks
from kvrelay.engines.reference.sequence import SamplingParams, Sequence
from kvrelay.engines.reference.weights import random_weights
from kvrelay.store.process import DaemonProcess

SUITE = "pd"
ONE = SamplingParams(max_tokens=1)


class _Prompts:
    def __init__(self, vocab: int) -> None:
        self.vocab, self.seed = vocab, 0

    def make(self, n: int) -> list[int]:
        self.seed += 1
        g = torch.Generator().manual_seed(900_000 + self.seed)
        return torch.randint(0, self.vocab, (n,), generator=g).tolist()


def _prefill_alone(eng: Engine, prompt: list[int]) -> float:
    t0 = time.perf_counter()
    eng.run([Sequence(prompt, ONE)])
    return time.perf_counter() - t0


def _pd_once(pre: Engine, dec: Engine, prompt: list[int], store: str, transport: str) -> tuple[float, float]:
    """(TTFT at the decode side, prefill forward time inside the run), both from the decode leg's send."""
    rid = f"bench-{uuid.uuid4().hex[:12]}"
    kp = transfer_params(prompt, rid, pre.model_cfg.model_id, pre.compat_hash, pre.cfg.chunk_tokens,
                         pre.layout.num_layers, 0, pre.layout.num_kv_heads, store, transport)
    done = threading.Event()
    first: list[float] = []

    def on_token(seq, tok, fin) -> None:
        first.append(time.perf_counter())
        done.set()

    seq = Sequence(prompt, ONE, kv_params=kp, on_token=on_token)
    t0 = time.perf_counter()
    dec.add(seq)
    (pseq,) = pre.run([Sequence(prompt, ONE, publish=True, request_id=rid)])
    if pseq.first_token_time is None:
        raise RuntimeError(f"the prefill of {len(prompt)} tokens over {transport} produced no token")
    forward = pseq.first_token_time - pseq.arrival
    if not done.wait(120):
        raise TimeoutError(f"decode did not receive {len(prompt)} tokens of KV within 120 s over {transport}")
    if seq.error or seq.recomputed is not None:
        raise RuntimeError(f"P/D over {transport} did not pull: {seq.error or seq.recomputed}")
    return first[0] - t0, forward


def run(ctx: BenchContext) -> None:
    from kvrelay.transfer import STORE_TRANSPORTS, available_transports
    transports = [t for t, why in available_transports().items() if why is None and t in STORE_TRANSPORTS]
    lengths = [1024] if ctx.quick else [1024, 2048]
    reps = 2 if ctx.quick else 4
    mcfg = ModelConfig()
    weights = random_weights(mcfg)
    prompts = _Prompts(mcfg.vocab_size)
    daemon = DaemonProcess(pool_size="1GiB", transports=",".join(transports)).start()
    engines: list[Engine] = []
    try:
        col = Engine(mcfg, EngineConfig(num_blocks=512), weights)
        pres = {}
        for layerwise in (True, False):
            cfg = EngineConfig(role="prefill", num_blocks=512)
            pub, _ = make_hooks("prefill", mcfg, cfg, daemon.address, "shm", layerwise=layerwise)
            pres[layerwise] = Engine(mcfg, cfg, weights, publisher=pub)
            engines.append(pres[layerwise])
        _prefill_alone(col, prompts.make(256))  # warm-up
        for transport in ctx.steps(transports, "transports"):
            dcfg = EngineConfig(role="decode", block_size=32, num_blocks=256)
            _, pull = make_hooks("decode", mcfg, dcfg, daemon.address, transport)
            dec = Engine(mcfg, dcfg, weights, puller=pull).start()
            engines.append(dec)
            _pd_once(pres[True], dec, prompts.make(256), daemon.address, transport)  # warm-up the data path
            for n in lengths:
                base: list[float] = []
                ttft: dict[bool, list[float]] = {True: [], False: []}
                fwd: dict[bool, list[float]] = {True: [], False: []}
                for _ in range(reps):  # interleaved so drifts in machine load hit all three alike
                    base.append(_prefill_alone(col, prompts.make(n)))
                    for layerwise in (True, False):
                        t, f = _pd_once(pres[layerwise], dec, prompts.make(n), daemon.address, transport)
                        ttft[layerwise].append(t)
                        fwd[layerwise].append(f)
                b = median(base)
                on, off = median(ttft[True]), median(ttft[False])
                # exposed transfer: what the decode still waits for after the prefill's forward pass ended,
                # measured inside each run (robust to the run-to-run noise of the forward pass itself)
                exp_on = median([t - f for t, f in zip(ttft[True], fwd[True], strict=True)])
                exp_off = median([t - f for t, f in zip(ttft[False], fwd[False], strict=True)])
                nbytes = mcfg.num_layers * pres[True].layout.chunk_nbytes(n)
                params = {"tokens": n, "reps": reps, "kv_bytes": nbytes, "layers": mcfg.num_layers,
                          "threads": torch.get_num_threads(), "decode_block_size": 32, "prefill_block_size": 16,
                          "forward_in_pd_layerwise_s": median(fwd[True]), "forward_in_pd_after_s": median(fwd[False])}
                case = f"{transport}/{n}tok"
                ctx.add(Record.compare(SUITE, case + "/layerwise", "ttft", on, "s", "prefill compute alone", b,
                                       params, lower_is_better=True))
                ctx.add(Record.compare(SUITE, case + "/after", "ttft", off, "s", "prefill compute alone", b,
                                       params, lower_is_better=True))
                ctx.add(Record.compare(SUITE, case + "/layerwise", "exposed_transfer", exp_on * 1e3, "ms",
                                       "layer-wise off", exp_off * 1e3, params, lower_is_better=True))
                ctx.add(Record.compare(SUITE, case + "/layerwise", "overhead_pct", 100 * exp_on / b, "%",
                                       "layer-wise off", 100 * exp_off / b, params, lower_is_better=True))
                hidden = 1.0 - exp_on / exp_off if exp_off > 0 else 0.0
                ctx.add(Record.compare(SUITE, case, "transfer_hidden_fraction", hidden, "fraction",
                                       "nothing hidden (layer-wise off)", 0.0, params))
    finally:
        for e in engines:
            e.stop()
        daemon.stop()
