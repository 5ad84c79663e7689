"""Prefill role: publish each layer's KV to the store while the next layer computes.

Owns: `LayerPublisher`, the engine's `KVPublisher` hook.  Before a prefill step it computes each
publishing request's content addresses (`kvrelay.keys.block_hashes` over ``chunk_tokens`` tokens) and
reserves every (layer, chunk) in the store in one call; after a layer's KV is written (the model's layer
hook) it hands that layer to a publisher thread, which packs each chunk straight into its pool slot
(`kvrelay.kernels.pack`), checksums it and commits it; the main thread computes on.  When a request's
last layer is committed, the engine is told to free its blocks.  With ``layerwise=False`` (the baseline
other KV layers use) every layer is published only after the whole forward pass.  Must not touch: the
engine's scheduling or the cache contents.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

import torch
import xxhash

from kvrelay.engines.reference.sequence import Sequence
from kvrelay.keys import ChunkKey, block_hashes
from kvrelay.kernels import pack
from kvrelay.kernels.layout import dtype_name
from kvrelay.params import KVTransferParams
from kvrelay.transfer.wire import ChunkHeader, checksum

log = logging.getLogger("kvrelay.engine.publish")


def first_token_key(request_id: str, hashes: list[str]) -> ChunkKey:
    """Where the prefill publishes a request's sampled first token (8 bytes, int64), after its last
    layer: a decode leg sent before the prefill answered (``first_token`` unknown) pulls it from there.
    Keyed by request id, not content: the first token depends on sampling."""
    h = xxhash.xxh3_128_hexdigest(f"first-token|{request_id}|{hashes[-1] if hashes else ''}".encode())
    return ChunkKey(h, -1, 0, 0)


def first_token_header(compat_hash: str, num_tokens: int, payload: torch.Tensor) -> ChunkHeader:
    return ChunkHeader(compat_hash=compat_hash, layer=-1, token_start=num_tokens, token_end=num_tokens + 1,
                       head_start=0, head_end=0, dtype="int64", nbytes=8, checksum=checksum(payload))


def transfer_params(prompt: list[int], request_id: str, model_id: str, compat_hash: str, chunk_tokens: int,
                    num_layers: int, head_start: int, head_end: int, store_address: str, transport: str,
                    first_token: int | None = None, prefill_epoch: str = "") -> KVTransferParams:
    """The `KVTransferParams` a prefill of ``prompt`` publishes under.  A router can build them itself and
    send the decode leg at once (``first_token=None``: the decode pulls it from the store)."""
    return KVTransferParams(
        request_id=request_id, model_id=model_id, compat_hash=compat_hash, num_tokens=len(prompt),
        chunk_tokens=chunk_tokens, block_hashes=block_hashes(prompt, chunk_tokens, model_id, compat_hash),
        num_layers=num_layers, head_start=head_start, head_end=head_end, store_address=store_address,
        transport=transport, first_token=first_token, prefill_epoch=prefill_epoch)


def chunk_ranges(num_tokens: int, chunk_tokens: int) -> list[tuple[int, int]]:
    return [(s, min(num_tokens, s + chunk_tokens)) for s in range(0, num_tokens, chunk_tokens)]


class LayerPublisher:
    def __init__(self, client, store_address: str, transport: str, layerwise: bool = True,
                 reserve_ttl: float = 120.0) -> None:
        self.client = client
        self.store_address, self.transport = store_address, transport
        self.layerwise = layerwise
        self.reserve_ttl = reserve_ttl
        self.engine = None
        self._batch: list[Sequence] = []
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="kv-publisher", daemon=True)
        self._thread.start()
        self.busy_s = 0.0  # time the publisher thread spent packing + committing (bench)

    # ---- engine thread -------------------------------------------------------------------------------
    def begin(self, engine, seqs: list[Sequence]) -> None:
        self.engine = engine
        layout, mcfg, ecfg = engine.layout, engine.model_cfg, engine.cfg
        self._batch = []
        for seq in seqs:
            n = len(seq.prompt)
            kp = transfer_params(seq.prompt, seq.request_id, mcfg.model_id, engine.compat_hash, ecfg.chunk_tokens,
                                 layout.num_layers, layout.head_start, layout.head_end, self.store_address,
                                 self.transport, prefill_epoch=engine.epoch)
            hashes = kp.block_hashes
            ranges = chunk_ranges(n, ecfg.chunk_tokens)
            heads = (layout.head_start, layout.head_end)
            chunks = [(layer, ChunkKey(h, layer, *heads), t0, t1)
                      for layer in range(layout.num_layers) for h, (t0, t1) in zip(hashes, ranges)]
            meta = first_token_key(seq.request_id, hashes)
            try:
                self.client.reserve(seq.request_id, [(k, layout.chunk_nbytes(t1 - t0)) for _, k, t0, t1 in chunks]
                                    + [(meta, 8)], ttl=self.reserve_ttl)
            except Exception as exc:  # the store is full or gone: answer without kv_transfer_params
                log.warning("reserve for %s failed: %s", seq.request_id, exc)
                engine.metrics.publish_errors.labels(type(exc).__name__).inc()
                seq.extra["publish_error"] = str(exc)
                self._abort(seq, f"the prefill could not reserve its chunks: {exc}")
                continue
            seq.extra["publish_pending"] = True
            seq.extra["publish_chunks"] = chunks
            seq.extra["publish_meta"] = meta
            seq.extra["kv_transfer_params"] = kp
            self._batch.append(seq)

    def layer_done(self, layer: int) -> None:
        if self.layerwise and self._batch:
            self._jobs.put(("layer", layer, list(self._batch)))

    def end(self, seqs: list[Sequence], first_tokens: list[int], done: Callable[[Sequence], None]) -> None:
        batch, self._batch = self._batch, []
        if not self.layerwise:
            for layer in range(self.engine.layout.num_layers):
                self._jobs.put(("layer", layer, batch))
        for seq, tok in zip(seqs, first_tokens):
            kp = seq.extra.get("kv_transfer_params")
            if kp is not None:
                kp.first_token = tok
        self._jobs.put(("done", time.monotonic(), batch, done))

    def close(self) -> None:
        self._jobs.put(("stop",))
        self._thread.join(10)
        self.client.close()

    # ---- publisher thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job[0] == "stop":
                return
            if job[0] == "layer":
                t0 = time.perf_counter()
                for seq in job[2]:
                    if "publish_error" not in seq.extra:
                        self._publish(seq, job[1])
                self.busy_s += time.perf_counter() - t0
            else:
                _, t_end, batch, done = job
                for seq in batch:
                    if "publish_error" not in seq.extra:
                        self._publish_first_token(seq)
                    self.engine.metrics.publish_lag.observe(time.monotonic() - t_end)
                    if "publish_error" in seq.extra:
                        try:
                            self.client.release(seq.request_id)
                        except Exception:  # noqa: BLE001 - best effort; reservations expire anyway
                            pass
                    seq.extra.pop("publish_pending", None)
                    done(seq)

    def _publish_first_token(self, seq: Sequence) -> None:
        kp = seq.extra["kv_transfer_params"]
        try:
            buf = self.client.publish_buffer(seq.extra["publish_meta"])
            payload = torch.tensor([kp.first_token], dtype=torch.int64).view(torch.uint8)
            buf[:8].copy_(payload)
            self.client.commit(seq.extra["publish_meta"], first_token_header(kp.compat_hash, kp.num_tokens, payload))
        except Exception as exc:  # noqa: BLE001 - decode legs that know the first token do not need it
            log.warning("publishing the first token of %s failed: %s", seq.request_id, exc)
            self.engine.metrics.publish_errors.labels(type(exc).__name__).inc()
            self._abort(seq, f"the prefill could not publish its first token: {exc}")

    def _publish(self, seq: Sequence, layer: int) -> None:
        engine = self.engine
        layout = engine.layout
        try:
            for li, key, t0, t1 in seq.extra["publish_chunks"]:
                if li != layer:
                    continue
                buf = self.client.publish_buffer(key)
                n = pack(layout, engine.cache[layer], seq.block_table, t0, t1, buf)
                header = ChunkHeader(compat_hash=engine.compat_hash, layer=layer, token_start=t0, token_end=t1,
                                     head_start=layout.head_start, head_end=layout.head_end,
                                     dtype=dtype_name(layout.dtype), nbytes=n, checksum=checksum(buf[:n]))
                self.client.commit(key, header, wait=False)  # pipelined: one round trip per layer, below
                engine.metrics.publish_chunks.inc()
                engine.metrics.publish_bytes.inc(n)
            self.client.flush()  # the layer's commits are answered; the first failure raises here
        except Exception as exc:  # noqa: BLE001 - the decode side times out and recomputes
            log.warning("publishing layer %d of %s failed: %s", layer, seq.request_id, exc)
            engine.metrics.publish_errors.labels(type(exc).__name__).inc()
            seq.extra["publish_error"] = str(exc)
            self._abort(seq, f"the prefill could not publish layer {layer}: {exc}")

    def _abort(self, seq: Sequence, reason: str) -> None:
        """A decode leg may already wait for this request's chunks: make its pulls fail now (it recomputes)
        instead of at its deadline."""
        try:
            self.client.abort(seq.request_id, reason)
        except Exception as exc:  # noqa: BLE001 - the store is gone: the decode's deadline still bounds the wait
            log.warning("could not tell the store that %s is aborted: %s", seq.request_id, exc)
