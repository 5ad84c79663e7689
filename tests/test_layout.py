"""KVLayout: geometry read from live tensors, validation errors that name both values, compat hash."""

import pytest
import torch

from kvrelay.kernels.layout import KVLayout, Order

SHAPES = {
    ("NHD", True): (2, 6, 16, 4, 8),
    ("NHD", False): (6, 16, 4, 8),
    ("HND", True): (2, 6, 4, 16, 8),
    ("HND", False): (6, 4, 16, 8),
    ("CPU", True): (6, 4, 16, 16),
    ("MLA", True): (6, 16, 8),
}


@pytest.mark.parametrize("order,fused", list(SHAPES))
def test_from_tensors_reads_geometry(order, fused):
    shape = SHAPES[(order, fused)]
    layers = [torch.zeros(shape, dtype=torch.bfloat16) if fused else
              (torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16)) for _ in range(3)]
    layout = KVLayout.from_tensors(layers, order=order)
    assert layout.num_layers == 3 and layout.num_blocks == 6 and layout.block_size == 16
    assert layout.head_dim == 8
    assert layout.num_kv_heads == (1 if order == "MLA" else 4)
    assert layout.tensor_shape() == shape
    view = layout.layer_view(layers[0])
    # Every (kv, block, slot, head) row addresses a distinct, in-bounds byte range.
    t = view.tensors[0]
    nbytes = t.numel() * t.element_size()
    seen = set()
    for kv in range(layout.num_kv):
        for b in (0, 5):
            for s in (0, 15):
                for h in range(view.num_heads):
                    off = view.offsets[kv] + b * view.block_stride + s * view.token_stride + h * view.head_stride
                    assert 0 <= off and off + view.row_bytes <= nbytes
                    key = off if len(set(map(id, view.tensors))) == 1 else (kv, off)
                    assert key not in seen
                    seen.add(key)


def test_layer_view_addresses_match_tensor_indexing():
    layout = KVLayout(num_layers=1, num_blocks=3, block_size=4, num_kv_heads=2, head_dim=5, dtype=torch.float32,
                      order=Order.CPU)
    (cache,) = layout.allocate()
    cache.copy_(torch.arange(cache.numel(), dtype=torch.float32).view_as(cache))
    view = layout.layer_view(cache)
    flat = cache.view(-1)
    for kv in range(2):
        for b in range(3):
            for s in range(4):
                for h in range(2):
                    off = (view.offsets[kv] + b * view.block_stride + s * view.token_stride + h * view.head_stride) // 4
                    expect = cache[b, h, s, kv * 5:(kv + 1) * 5]
                    assert torch.equal(flat[off:off + 5], expect)


def test_mismatches_name_expected_and_actual():
    layout = KVLayout(num_layers=1, num_blocks=4, block_size=16, num_kv_heads=2, head_dim=8, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"expected \(2, 4, 16, 2, 8\), got \(2, 4, 16, 2, 9\)"):
        layout.validate_layer(torch.zeros(2, 4, 16, 2, 9, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"dtype mismatch: expected torch.float16, got torch.float32"):
        layout.validate_layer(torch.zeros(2, 4, 16, 2, 8))
    with pytest.raises(ValueError, match="last dim must be contiguous"):
        layout.validate_layer(torch.zeros(2, 4, 16, 8, 2, dtype=torch.float16).transpose(-1, -2))
    with pytest.raises(ValueError, match="block_size mismatch: expected 32, tensors have 16"):
        KVLayout.from_tensors(layout.allocate(), order="NHD", block_size=32)
    with pytest.raises(ValueError, match="head slice"):
        KVLayout(num_layers=1, num_blocks=4, block_size=16, num_kv_heads=2, head_dim=8, dtype=torch.float16,
                 head_start=1, total_kv_heads=2)
    with pytest.raises(ValueError, match="unsupported KV dtype"):
        KVLayout(num_layers=1, num_blocks=4, block_size=16, num_kv_heads=2, head_dim=8, dtype=torch.int32)
    with pytest.raises(ValueError, match="num_blocks must be a positive int"):
        KVLayout(num_layers=1, num_blocks=0, block_size=16, num_kv_heads=2, head_dim=8, dtype=torch.float16)


def test_compat_hash_ignores_convertible_fields_only():
    base = dict(num_layers=4, num_blocks=8, block_size=16, num_kv_heads=4, head_dim=64, dtype=torch.bfloat16)
    h = KVLayout(**base).compat_hash("m")
    # Block size, order, fusion and the head slice are converted on unpack: same hash.
    assert KVLayout(**{**base, "block_size": 32, "num_blocks": 3}).compat_hash("m") == h
    assert KVLayout(**{**base, "order": "HND", "kv_fused": False}).compat_hash("m") == h
    assert KVLayout(**{**base, "num_kv_heads": 2, "head_start": 2, "total_kv_heads": 4}).compat_hash("m") == h
    # Model, dtype, head_dim, total heads, layers: different hash.
    assert KVLayout(**base).compat_hash("other") != h
    assert KVLayout(**{**base, "dtype": torch.float16}).compat_hash("m") != h
    assert KVLayout(**{**base, "head_dim": 128}).compat_hash("m") != h
    assert KVLayout(**{**base, "num_layers": 5}).compat_hash("m") != h
