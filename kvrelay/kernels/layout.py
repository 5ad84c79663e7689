"""KV cache layout descriptors: what an engine's paged KV cache looks like in memory.

Owns: `KVLayout` (the geometry of one rank's paged cache), `LayerView` (one layer's tensors reduced to
byte strides, which every pack/unpack implementation consumes), validation of live tensors against a
layout, and the compatibility hash.  Must not touch: the tensors' contents, transports or the store.

Canonical chunk order (the wire format, independent of block size and cache layout):

    [kv, tokens, heads, head_dim]      kv = 2 (K then V) for attention, 1 for MLA (heads = 1,
                                       head_dim = latent dim)

Cache orders (per layer; ``kv_fused`` selects one tensor with a leading 2 or a (K, V) pair):

    NHD  vLLM GPU   [2, num_blocks, block_size, heads, head_dim]   or K, V: [num_blocks, block_size, heads, head_dim]
    HND             [2, num_blocks, heads, block_size, head_dim]   or K, V: [num_blocks, heads, block_size, head_dim]
    CPU  vLLM CPU   [num_blocks, heads, block_size, 2 * head_dim]  (K in the first half of the last dim)
    MLA             [num_blocks, block_size, latent_dim]
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from typing import Sequence, Union

import torch

from kvrelay.versions import WIRE_VERSION  # noqa: E402  (re-exported: bumped when the chunk format changes)

SUPPORTED_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "uint8": torch.uint8,
}


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in SUPPORTED_DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"unsupported KV dtype {dtype}; supported: {', '.join(SUPPORTED_DTYPES)}")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return SUPPORTED_DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported KV dtype {name!r}; supported: {', '.join(SUPPORTED_DTYPES)}") from None


class Order(str, enum.Enum):
    NHD = "NHD"
    HND = "HND"
    CPU = "CPU"
    MLA = "MLA"


LayerTensors = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True, slots=True)
class LayerView:
    """One layer of a paged cache as raw byte strides.

    Element (kv, block b, slot s, head h) starts at byte
    ``tensors[kv].data_ptr() + offsets[kv] + b * block_stride + s * token_stride + h * head_stride``
    and spans ``row_bytes`` contiguous bytes (one head_dim row).  ``tensors`` has one entry per kv
    plane (they may be the same tensor, e.g. fused or CPU order).
    """

    tensors: tuple[torch.Tensor, ...] = field(repr=False)
    offsets: tuple[int, ...]
    block_stride: int
    token_stride: int
    head_stride: int
    row_bytes: int
    num_blocks: int
    block_size: int
    num_heads: int


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Geometry of one rank's paged KV cache.  Validates itself on construction."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int  # heads held by this rank
    head_dim: int  # latent dim for MLA
    dtype: torch.dtype
    order: Order = Order.NHD
    kv_fused: bool = True
    head_start: int = 0  # first model KV head held by this rank (tensor parallelism)
    total_kv_heads: int = -1  # the model's KV heads; -1 means num_kv_heads (no TP)

    def __post_init__(self) -> None:
        if self.total_kv_heads == -1:
            object.__setattr__(self, "total_kv_heads", self.num_kv_heads)
        object.__setattr__(self, "order", Order(self.order))
        dtype_name(self.dtype)  # raises for unsupported dtypes
        for name in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVLayout.{name} must be a positive int, got {value!r}")
        if self.order is Order.MLA and (self.num_kv_heads != 1 or self.total_kv_heads != 1):
            raise ValueError(f"MLA layouts hold one latent 'head'; got num_kv_heads={self.num_kv_heads}, "
                             f"total_kv_heads={self.total_kv_heads}")
        if self.head_start < 0 or self.head_start + self.num_kv_heads > self.total_kv_heads:
            raise ValueError(f"head slice [{self.head_start}, {self.head_start + self.num_kv_heads}) is outside "
                             f"the model's {self.total_kv_heads} KV heads")

    # ---- derived geometry -------------------------------------------------------------------
    @property
    def num_kv(self) -> int:
        """Planes per token: 2 (K, V) for attention, 1 for MLA."""
        return 1 if self.order is Order.MLA else 2

    @property
    def head_end(self) -> int:
        return self.head_start + self.num_kv_heads

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def fused(self) -> bool:
        """True when a layer is one tensor (fused NHD/HND, CPU, MLA)."""
        return self.kv_fused or self.order in (Order.CPU, Order.MLA)

    def tensor_shape(self) -> tuple[int, ...]:
        """Shape of one layer's tensor (of each of K and V when not fused)."""
        nb, bs, h, d = self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim
        if self.order is Order.MLA:
            return (nb, bs, d)
        if self.order is Order.CPU:
            return (nb, h, bs, 2 * d)
        per = (nb, bs, h, d) if self.order is Order.NHD else (nb, h, bs, d)
        return (2, *per) if self.kv_fused else per

    def token_bytes(self, num_heads: int | None = None) -> int:
        """Bytes one token occupies in a chunk holding ``num_heads`` heads (default: this rank's)."""
        heads = self.num_kv_heads if num_heads is None else num_heads
        return self.num_kv * heads * self.head_dim * self.itemsize

    def chunk_shape(self, num_tokens: int, num_heads: int | None = None) -> tuple[int, int, int, int]:
        heads = self.num_kv_heads if num_heads is None else num_heads
        return (self.num_kv, num_tokens, heads, self.head_dim)

    def chunk_nbytes(self, num_tokens: int, num_heads: int | None = None) -> int:
        return num_tokens * self.token_bytes(num_heads)

    def compat_hash(self, model_id: str) -> str:
        """Hash over what both sides of a transfer must agree on.

        Block size, cache order and the head slice are deliberately *not* included: chunks are in a
        canonical order, carry their head range, and are converted on unpack.
        """
        kind = "mla" if self.order is Order.MLA else "kv"
        text = "|".join(map(str, (model_id, dtype_name(self.dtype), kind, self.head_dim, self.total_kv_heads,
                                  self.num_layers, WIRE_VERSION)))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def allocate(self, device: str | torch.device = "cpu") -> list[LayerTensors]:
        """Allocate a zeroed cache of this layout (tests, the reference engine)."""
        shape = self.tensor_shape()
        if self.fused:
            return [torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(self.num_layers)]
        return [(torch.zeros(shape, dtype=self.dtype, device=device),
                 torch.zeros(shape, dtype=self.dtype, device=device)) for _ in range(self.num_layers)]

    # ---- live tensors ---------------------------------------------------------------------------
    @classmethod
    def from_tensors(cls, layers: Sequence[LayerTensors], *, order: Order | str, block_size: int | None = None,
                     head_start: int = 0, total_kv_heads: int = -1) -> "KVLayout":
        """Describe a live cache; the geometry is read from the first layer and every layer is validated."""
        if len(layers) == 0:
            raise ValueError("KVLayout.from_tensors needs at least one layer")
        order = Order(order)
        first = layers[0]
        fused = isinstance(first, torch.Tensor)
        t = first if isinstance(first, torch.Tensor) else first[0]
        shape = tuple(t.shape)
        if order is Order.MLA:
            _expect_rank(shape, 3, "MLA [num_blocks, block_size, latent_dim]")
            nb, bs, h, d = shape[0], shape[1], 1, shape[2]
        elif order is Order.CPU:
            _expect_rank(shape, 4, "CPU [num_blocks, heads, block_size, 2*head_dim]")
            if shape[3] % 2:
                raise ValueError(f"CPU layout's last dim must be 2*head_dim (even), got {shape[3]}")
            nb, h, bs, d = shape[0], shape[1], shape[2], shape[3] // 2
        else:
            per = shape[1:] if fused else shape
            if fused:
                _expect_rank(shape, 5, f"fused {order.value} [2, num_blocks, ...]")
                if shape[0] != 2:
                    raise ValueError(f"fused {order.value} layer must have a leading dim of 2 (K, V), got {shape[0]}")
            else:
                _expect_rank(shape, 4, f"split {order.value} [num_blocks, ...]")
            if order is Order.NHD:
                nb, bs, h, d = per
            else:
                nb, h, bs, d = per
        if block_size is not None and block_size != bs:
            raise ValueError(f"block_size mismatch: expected {block_size}, tensors have {bs}")
        layout = cls(num_layers=len(layers), num_blocks=nb, block_size=bs, num_kv_heads=h, head_dim=d,
                     dtype=t.dtype, order=order, kv_fused=fused, head_start=head_start,
                     total_kv_heads=total_kv_heads)
        device = t.device
        for i, layer in enumerate(layers):
            layout.validate_layer(layer, i, device=device)
        return layout

    def validate_layer(self, layer: LayerTensors, index: int = 0, device: torch.device | None = None) -> None:
        """Raise ValueError naming expected and actual values if ``layer`` does not match this layout."""
        tensors = (layer,) if isinstance(layer, torch.Tensor) else tuple(layer)
        want = 1 if self.fused else 2
        if len(tensors) != want:
            raise ValueError(f"layer {index}: expected {'one tensor' if want == 1 else 'a (K, V) pair'}, "
                             f"got {len(tensors)} tensors")
        shape = self.tensor_shape()
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"layer {index}: expected a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise ValueError(f"layer {index}: shape mismatch: expected {shape}, got {tuple(t.shape)}")
            if t.dtype != self.dtype:
                raise ValueError(f"layer {index}: dtype mismatch: expected {self.dtype}, got {t.dtype}")
            if device is not None and t.device != device:
                raise ValueError(f"layer {index}: device mismatch: expected {device}, got {t.device}")
            if t.stride(-1) != 1:
                raise ValueError(f"layer {index}: last dim must be contiguous (stride 1), got strides {t.stride()}")
            # Rows of one head_dim must not overlap each other: strides of the block/token/head dims must
            # be at least a row apart (we do not demand full contiguity: vLLM may pad blocks).
            for dim in range(t.dim() - 1):
                if t.shape[dim] > 1 and t.stride(dim) < self.head_dim:
                    raise ValueError(f"layer {index}: stride {t.stride(dim)} of dim {dim} is smaller than a "
                                     f"head_dim row ({self.head_dim}); overlapping layouts are not supported")

    def layer_view(self, layer: LayerTensors) -> LayerView:
        """Reduce one (validated) layer to byte strides for the pack/unpack implementations."""
        self.validate_layer(layer)
        isz = self.itemsize
        row = self.head_dim * isz
        if self.order is Order.MLA:
            t = layer if isinstance(layer, torch.Tensor) else layer[0]
            return LayerView((t,), (0,), t.stride(0) * isz, t.stride(1) * isz, row, row,
                             self.num_blocks, self.block_size, 1)
        if isinstance(layer, torch.Tensor):  # CPU order, or K and V fused (validate_layer checked which)
            t = layer
            if self.order is Order.CPU:
                return LayerView((t, t), (0, row), t.stride(0) * isz, t.stride(2) * isz, t.stride(1) * isz, row,
                                 self.num_blocks, self.block_size, self.num_kv_heads)
            planes: tuple[torch.Tensor, ...] = (t, t)
            offsets = (0, t.stride(0) * isz)
            s = t.stride()[1:]
        else:
            planes = tuple(layer)
            offsets = (0, 0)
            s = planes[0].stride()
            if planes[1].stride() != planes[0].stride():
                raise ValueError(f"K and V strides differ: {planes[0].stride()} vs {planes[1].stride()}")
        if self.order is Order.NHD:
            block, token, head = s[0], s[1], s[2]
        else:
            block, head, token = s[0], s[1], s[2]
        return LayerView(planes, offsets, block * isz, token * isz, head * isz, row,
                         self.num_blocks, self.block_size, self.num_kv_heads)


def _expect_rank(shape: tuple[int, ...], rank: int, what: str) -> None:
    if len(shape) != rank:
        raise ValueError(f"expected a {rank}-d tensor for {what}, got shape {shape}")
