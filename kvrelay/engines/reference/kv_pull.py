"""Decode role: fill a request's blocks with its prompt KV pulled from the store.

Owns: `LayerPuller`, the engine's `KVPuller` hook.  For a request carrying `KVTransferParams` it skips
the tokens the engine's own prefix cache already holds, then pulls layer by layer, up to
PULL_BATCH chunks of a layer per round trip (as soon as the prefill has committed them all; the store
parks the pull until then, within the request's deadline), verifies
each header against what it asked for (checksums are verified by the client), and unpacks into this
engine's block size (`kvrelay.kernels.unpack`).  It reports success or a reason to the engine, which
applies the failure policy.  Must not touch: the engine's scheduling; blocks other than the request's.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from kvrelay.engines.reference.kv_publish import chunk_ranges, first_token_key
from kvrelay.engines.reference.sequence import Sequence
from kvrelay.keys import ChunkKey
from kvrelay.kernels import unpack
from kvrelay.kernels.layout import dtype_name

log = logging.getLogger("kvrelay.engine.pull")
PULL_BATCH = 8  # chunks of one layer pulled per store round trip (StoreClient.pull_many)


class LayerPuller:
    def __init__(self, client, store_address: str, workers: int = 2) -> None:
        self.client = client
        self.store_address = store_address
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kv-puller")
        self._tls = threading.local()

    def start(self, engine, seq: Sequence, done: Callable[[Sequence, str | None], None]) -> None:
        self._pool.submit(self._pull_guarded, engine, seq, done)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()

    def _buffer(self, nbytes: int) -> torch.Tensor:
        buf = getattr(self._tls, "buf", None)
        if buf is None or buf.numel() < nbytes:
            buf = self._tls.buf = torch.empty(nbytes, dtype=torch.uint8)
        return buf

    def _pull_guarded(self, engine, seq: Sequence, done: Callable[[Sequence, str | None], None]) -> None:
        try:
            self._pull(engine, seq)
        except TimeoutError as exc:
            done(seq, f"timeout: {exc}")
        except Exception as exc:  # noqa: BLE001 - every failure becomes a reason for the policy
            code = getattr(exc, "code", None) or type(exc).__name__
            done(seq, f"{code}: {exc}")
        else:
            done(seq, None)

    def _pull(self, engine, seq: Sequence) -> None:
        kp = seq.kv_params
        layout = engine.layout
        if kp.store_address != self.store_address:
            raise ValueError(f"kv_transfer_params name store {kp.store_address}, this worker uses "
                             f"{self.store_address}")
        if kp.num_layers != layout.num_layers:
            raise ValueError(f"kv_transfer_params has {kp.num_layers} layers, this model {layout.num_layers}")
        deadline = time.monotonic() + engine.cfg.pull_timeout_s
        skip = seq.num_cached_tokens
        todo = [(h, t0, t1) for h, (t0, t1) in zip(kp.block_hashes, chunk_ranges(kp.num_tokens, kp.chunk_tokens))
                if t1 > skip]
        want_dtype = dtype_name(layout.dtype)
        cbytes = layout.chunk_nbytes(kp.chunk_tokens, kp.head_end - kp.head_start)
        batch = max(1, min(PULL_BATCH, len(todo)))
        buf = self._buffer(batch * cbytes)
        outs = [buf[i * cbytes:(i + 1) * cbytes] for i in range(batch)]
        pulled = 0
        for layer in range(layout.num_layers):
            for g in range(0, len(todo), batch):
                group = todo[g:g + batch]
                if seq.extra.get("aborted"):
                    raise RuntimeError("aborted")
                keys = [ChunkKey(h, layer, kp.head_start, kp.head_end) for h, _, _ in group]
                # one store round trip for the group (each chunk's checksum is still verified by the client)
                hdrs = self.client.pull_many(keys, outs[:len(group)], deadline, request_id=kp.request_id)
                for (h, t0, t1), key, hdr, out in zip(group, keys, hdrs, outs):
                    if (hdr.layer, hdr.token_start, hdr.token_end, hdr.head_start, hdr.head_end) != \
                            (layer, t0, t1, kp.head_start, kp.head_end) or hdr.dtype != want_dtype:
                        raise ValueError(f"chunk {key} has header layer {hdr.layer} tokens [{hdr.token_start}, "
                                         f"{hdr.token_end}) heads [{hdr.head_start}, {hdr.head_end}) {hdr.dtype}; "
                                         f"expected layer {layer} [{t0}, {t1}) [{kp.head_start}, {kp.head_end}) "
                                         f"{want_dtype}")
                    pulled += hdr.nbytes
                    chunk = out[:hdr.nbytes]
                    start = max(t0, skip)
                    if start > t0:  # this engine already holds the chunk's first tokens: unpack only the rest
                        heads = hdr.head_end - hdr.head_start
                        full = chunk.view(layout.dtype).view(layout.num_kv, t1 - t0, heads, layout.head_dim)
                        chunk = full[:, start - t0:].contiguous()
                    unpack(layout, engine.cache[layer], seq.block_table, start, t1, chunk, hdr.head_start,
                           hdr.head_end)
        if kp.first_token is None:  # the decode leg was sent before the prefill answered
            hdr = self.client.pull(first_token_key(kp.request_id, kp.block_hashes), buf, deadline,
                                   request_id=kp.request_id)
            if hdr.nbytes != 8 or hdr.dtype != "int64":
                raise ValueError(f"first-token chunk of {kp.request_id} has {hdr.nbytes} bytes of {hdr.dtype}")
            seq.output[-1] = int(buf[:8].view(torch.int64).item())
        engine.metrics.pull_bytes.inc(pulled)
