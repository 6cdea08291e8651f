"""MXFP4 dequantisation against a straightforward, value-by-value reference."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from gptoss_cloud.trainer.kernels.mxfp4 import dequantize_expert_weight, dequantize_mxfp4  # noqa: E402

E2M1 = {0: 0.0, 1: 0.5, 2: 1.0, 3: 1.5, 4: 2.0, 5: 3.0, 6: 4.0, 7: 6.0}


def _decode_nibble(code: int) -> float:
    sign = -1.0 if code & 0b1000 else 1.0
    return sign * E2M1[code & 0b0111]


def _reference(blocks, scales):
    """Byte by byte: low nibble is the even element, high nibble the odd one; scale 2**(s - 127)."""
    *prefix, g, b = blocks.shape
    out = torch.zeros(*prefix, g * b * 2, dtype=torch.float64)
    flat_b, flat_s, flat_o = blocks.reshape(-1, g, b), scales.reshape(-1, g), out.reshape(-1, g * b * 2)
    for r in range(flat_b.shape[0]):
        for gi in range(g):
            scale = math.ldexp(1.0, int(flat_s[r, gi]) - 127)
            for bi in range(b):
                byte = int(flat_b[r, gi, bi])
                flat_o[r, gi * b * 2 + 2 * bi] = _decode_nibble(byte & 0x0F) * scale
                flat_o[r, gi * b * 2 + 2 * bi + 1] = _decode_nibble(byte >> 4) * scale
    return out


def test_dequantize_matches_reference_on_random_packed_tensor():
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (2, 3, 2, 16), generator=g, dtype=torch.uint8)  # 2 experts, 3 rows, 64 cols
    scales = torch.randint(120, 134, (2, 3, 2), generator=g, dtype=torch.uint8)
    got = dequantize_mxfp4(blocks, scales, dtype=torch.float32, rows_per_chunk=4)
    assert got.shape == (2, 3, 64)
    torch.testing.assert_close(got.double(), _reference(blocks, scales), rtol=0, atol=0)
    # bf16 holds every e2m1 value times a power of two in range exactly.
    torch.testing.assert_close(dequantize_mxfp4(blocks, scales).double(), _reference(blocks, scales), rtol=0, atol=0)


def test_expert_weight_is_transposed_to_transformers_layout():
    blocks = torch.randint(0, 256, (2, 6, 1, 16), dtype=torch.uint8)  # (experts, out=6, in=32)
    scales = torch.full((2, 6, 1), 127, dtype=torch.uint8)
    w = dequantize_expert_weight(blocks, scales, dtype=torch.float32)
    assert w.shape == (2, 32, 6)
    torch.testing.assert_close(w.double(), _reference(blocks, scales).transpose(1, 2))


def test_known_bytes():
    # 0x21: low nibble 1 -> +0.5, high nibble 2 -> +1.0; 0x9F: low 0xF -> -6.0, high 0x9 -> -0.5
    blocks = torch.tensor([[[0x21, 0x9F] + [0] * 14]], dtype=torch.uint8)
    scales = torch.tensor([[128]], dtype=torch.uint8)  # x2
    out = dequantize_mxfp4(blocks, scales, dtype=torch.float32)
    assert out[0, :4].tolist() == [1.0, 2.0, -12.0, -1.0]


def test_bad_shapes_and_dtypes_are_refused():
    with pytest.raises(ValueError, match="uint8"):
        dequantize_mxfp4(torch.zeros(1, 1, 16), torch.zeros(1, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="do not match"):
        dequantize_mxfp4(torch.zeros(1, 2, 16, dtype=torch.uint8), torch.zeros(1, 3, dtype=torch.uint8))
