"""Pack and unpack for caches whose blocks keep each head's K and V in an engine-specific element order:
vLLM's CPU attention stores a layer as ``[num_blocks, kv_heads, block_size, 2*head_dim]``, but inside each
(block, head) the first ``block_size*head_dim`` elements are K and the next are V, each in an order the
attention kernel chose for the CPU's instruction set (AMX tiles, transposed K for AVX-512, ...).

Owns: `PermutedBlockCodec`, which is told that order as position maps (where canonical element
(token t, dim d) of K and of V lives inside a block-head) and converts whole blocks to and from the
canonical chunk order ``[2, tokens, heads, head_dim]``.  The native library gathers and scatters each canonical
row through the map (csrc/permcopy.c: one pass, partial blocks written in place, about 10x the torch path);
without it, or for a non-contiguous layer, torch gathers whole blocks and partial blocks are read, modified and
written back.  Deriving the maps is the engine adapter's job (kvrelay/engines/vllm).
Must not touch: transports, the store, checksums.
"""

from __future__ import annotations

from typing import Sequence

import torch

from kvrelay.kernels.layout import KVLayout, LayerTensors, Order

try:
    from kvrelay import _native
    HAVE_NATIVE = hasattr(_native, "perm_copy")
except ImportError:  # the torch path below still works
    HAVE_NATIVE = False


class PermutedBlockCodec:
    def __init__(self, layout: KVLayout, key_pos: torch.Tensor, value_pos: torch.Tensor,
                 use_native: bool = HAVE_NATIVE) -> None:
        if layout.order is not Order.CPU:
            raise ValueError(f"PermutedBlockCodec describes Order.CPU containers, got {layout.order.value}")
        n = layout.block_size * layout.head_dim
        for name, pos in (("key_pos", key_pos), ("value_pos", value_pos)):
            if pos.shape != (n,) or not torch.equal(torch.sort(pos.to(torch.long)).values, torch.arange(n)):
                raise ValueError(f"{name} must be a permutation of the {n} element positions of a block-head "
                                 f"(block_size {layout.block_size} x head_dim {layout.head_dim})")
        self.layout = layout
        # canonical (kv, token, dim) -> position inside a block-head's 2*bs*hd elements
        self.perm = torch.cat([key_pos.to(torch.long), value_pos.to(torch.long) + n])
        self.perm32 = self.perm.to(torch.int32).contiguous()  # the native path's map
        self.use_native = use_native and HAVE_NATIVE

    def _native(self, pack: bool, region: torch.Tensor, ids: torch.Tensor, first_token: int, tokens: int,
                chunk: torch.Tensor, chunk_heads: int, chunk_h0: int, cache_h0: int, num_heads: int) -> int:
        """``ids``: the blocks from the one holding the first token (``first_token`` counts from its start);
        cache heads [cache_h0, +num_heads) <-> chunk heads [chunk_h0, +num_heads) of a ``chunk_heads`` chunk."""
        lo = self.layout
        return _native.perm_copy(int(pack), region.data_ptr(), region.numel() * region.element_size(),
                                 lo.num_blocks, lo.num_kv_heads, lo.block_size, lo.head_dim, lo.itemsize,
                                 self.perm32.data_ptr(), ids.data_ptr(), len(ids), first_token, tokens, chunk.data_ptr(),
                                 chunk.numel() * chunk.element_size(), chunk_heads, chunk_h0, cache_h0, num_heads)

    def _native_ok(self, region: torch.Tensor, chunk: torch.Tensor) -> bool:
        return (self.use_native and region.device.type == "cpu" and region.is_contiguous()
                and chunk.device.type == "cpu" and chunk.is_contiguous())

    def _region(self, layer: LayerTensors) -> torch.Tensor:
        if not isinstance(layer, torch.Tensor):
            raise ValueError("a PermutedBlockCodec layer is one tensor [num_blocks, heads, block_size, 2*head_dim]")
        self.layout.validate_layer(layer)
        lo = self.layout
        return layer.view(lo.num_blocks, lo.num_kv_heads, 2 * lo.block_size * lo.head_dim)

    def _blocks(self, block_ids: Sequence[int], token_start: int, token_end: int) -> tuple[torch.Tensor, int]:
        bs = self.layout.block_size
        if not 0 <= token_start < token_end:
            raise ValueError(f"token range [{token_start}, {token_end}) is empty or negative")
        first, last = token_start // bs, -(-token_end // bs)
        if last > len(block_ids):
            raise ValueError(f"{len(block_ids)} block ids cannot hold tokens up to {token_end} "
                             f"(block size {bs})")
        ids = torch.as_tensor(list(block_ids[first:last]), dtype=torch.long)
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.layout.num_blocks):
            raise ValueError(f"block ids must lie in [0, {self.layout.num_blocks})")
        return ids, first * bs

    def _canonical(self, native: torch.Tensor) -> torch.Tensor:
        """[n, H, 2*bs*hd] native -> [2, n*bs, H, hd] canonical (a copy)."""
        lo = self.layout
        n = native.shape[0]
        canon = native.index_select(2, self.perm).view(n, lo.num_kv_heads, 2, lo.block_size, lo.head_dim)
        return canon.permute(2, 0, 3, 1, 4).reshape(2, n * lo.block_size, lo.num_kv_heads, lo.head_dim)

    def _heads(self, head_start: int | None, head_end: int | None) -> tuple[int, int]:
        """Model heads [head_start, head_end) packed (default: this cache's), checked against this cache's."""
        lo = self.layout
        hs = lo.head_start if head_start is None else head_start
        he = lo.head_end if head_end is None else head_end
        if not lo.head_start <= hs < he <= lo.head_end:
            raise ValueError(f"heads [{hs}, {he}) are not a non-empty part of this cache's [{lo.head_start}, "
                             f"{lo.head_end})")
        return hs, he

    def pack(self, layer: LayerTensors, block_ids: Sequence[int], token_start: int, token_end: int,
             out: torch.Tensor, head_start: int | None = None, head_end: int | None = None) -> int:
        """Tokens [token_start, token_end) of a request into ``out`` (uint8), canonical order, model heads
        [head_start, head_end) (default: all of this cache's; tensor parallelism publishes slices); returns bytes."""
        region = self._region(layer)
        ids, base = self._blocks(block_ids, token_start, token_end)
        lo = self.layout
        hs, he = self._heads(head_start, head_end)
        heads, h0 = he - hs, hs - lo.head_start
        tokens = token_end - token_start
        nbytes = lo.chunk_nbytes(tokens, heads)
        if out.dtype != torch.uint8 or out.numel() < nbytes:
            raise ValueError(f"out must be a uint8 tensor of at least {nbytes} bytes, got {out.numel()} "
                             f"{out.dtype}")
        if self._native_ok(region, out):
            return self._native(True, region, ids, token_start - base, tokens, out[:nbytes], heads, 0, h0, heads)
        canon = self._canonical(region.index_select(0, ids))
        dst = out[:nbytes].view(lo.dtype).view(2, tokens, heads, lo.head_dim)
        dst.copy_(canon[:, token_start - base:token_end - base, h0:h0 + heads])
        return nbytes

    def unpack(self, layer: LayerTensors, block_ids: Sequence[int], token_start: int, token_end: int,
               chunk: torch.Tensor, head_start: int, head_end: int) -> None:
        """Write a canonical chunk holding model heads [head_start, head_end) into the request's blocks: the
        heads it shares with this cache's [layout.head_start, layout.head_end) (tensor parallelism: a chunk may
        hold more heads than this rank keeps, or only some of them)."""
        lo = self.layout
        i0, i1 = max(head_start, lo.head_start), min(head_end, lo.head_end)
        if head_end <= head_start or i1 <= i0:
            raise ValueError(f"the chunk holds heads [{head_start}, {head_end}), none of this cache's "
                             f"[{lo.head_start}, {lo.head_end})")
        region = self._region(layer)
        ids, base = self._blocks(block_ids, token_start, token_end)
        tokens = token_end - token_start
        want = 2 * tokens * (head_end - head_start) * lo.head_dim * lo.itemsize
        if chunk.numel() * chunk.element_size() != want:
            raise ValueError(f"chunk has {chunk.numel() * chunk.element_size()} bytes, {tokens} tokens of heads "
                             f"[{head_start}, {head_end}) need {want}")
        if self._native_ok(region, chunk):
            self._native(False, region, ids, token_start - base, tokens, chunk.view(-1), head_end - head_start,
                         i0 - head_start, i0 - lo.head_start, i1 - i0)
            return
        src = chunk.contiguous().view(-1).view(torch.uint8).view(lo.dtype).view(
            2, tokens, head_end - head_start, lo.head_dim)[:, :, i0 - head_start:i1 - head_start]
        n = len(ids)
        canon = self._canonical(region.index_select(0, ids))
        canon[:, token_start - base:token_end - base, i0 - lo.head_start:i1 - lo.head_start] = src
        flat = canon.view(2, n, lo.block_size, lo.num_kv_heads, lo.head_dim).permute(1, 3, 0, 2, 4).reshape(
            n, lo.num_kv_heads, 2 * lo.block_size * lo.head_dim)
        native = torch.empty_like(flat)
        native.index_copy_(2, self.perm, flat)
        region.index_copy_(0, ids, native)
