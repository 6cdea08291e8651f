"""The MXFP4 quantiser against a straightforward value-by-value reference, and the round trip."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from gptoss_cloud.trainer.kernels.mxfp4 import FP4_E2M1, dequantize_expert_weight, dequantize_mxfp4, quantize_expert_weight, quantize_mxfp4

GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _reference_quantize(values: list[float]) -> tuple[int, list[float]]:
    """One group of 32: scale 2^e, the smallest with max|v| <= 6 * 2^e; each value to the nearest grid
    point, ties to the even code; returns (biased scale, dequantised values)."""
    amax = max(abs(v) for v in values)
    e = -127 if amax == 0 else max(-127, min(127, math.ceil(math.log2(amax / 6.0))))
    out = []
    for v in values:
        m = abs(v) / 2.0**e
        best = min(range(8), key=lambda c: (abs(GRID[c] - m), c % 2))  # nearest, then even code
        out.append(math.copysign(GRID[best] * 2.0**e, v) if GRID[best] else 0.0)
    return e + 127, out


def test_quantize_matches_reference_on_random_values():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 5, 64, generator=g) * torch.tensor([1e-3, 0.02, 1.0, 7.0, 300.0]).view(1, 5, 1)
    w[0, 0, :32] = 0.0  # an all-zero group
    blocks, scales = quantize_mxfp4(w)
    assert blocks.shape == (3, 5, 2, 16) and scales.shape == (3, 5, 2) and blocks.dtype == scales.dtype == torch.uint8
    got = dequantize_mxfp4(blocks, scales, torch.float64)
    flat_w, flat_got, flat_s = w.reshape(-1, 32).double(), got.reshape(-1, 32), scales.reshape(-1)
    for row in range(flat_w.shape[0]):
        scale, ref = _reference_quantize(flat_w[row].tolist())
        assert int(flat_s[row]) == scale
        assert flat_got[row].tolist() == ref


def test_ties_round_to_even_code_and_signs():
    # With amax = 6 the scale is 1: 0.25 -> 0 (code 0), 0.75 -> 1.0 (code 2), 1.25 -> 1.0, 1.75 -> 2.0, 2.5 -> 2, 3.5 -> 4, 5 -> 4
    vals = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, -5.0] + [0.0] * 22
    blocks, scales = quantize_mxfp4(torch.tensor(vals))
    assert int(scales[0]) == 127
    out = dequantize_mxfp4(blocks, scales, torch.float32)[:10].tolist()
    assert out == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -1.0, -4.0]


def test_grid_values_round_trip_exactly():
    """Every MXFP4 tensor survives dequantise -> quantise -> dequantise unchanged (what loading a
    dequantised released checkpoint into the MXFP4 module relies on)."""
    g = torch.Generator().manual_seed(2)
    blocks = torch.randint(0, 256, (4, 6, 3, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(100, 150, (4, 6, 3), generator=g, dtype=torch.uint8)
    for dtype in (torch.float32, torch.bfloat16):
        dense = dequantize_mxfp4(blocks, scales, dtype)
        again = dequantize_mxfp4(*quantize_mxfp4(dense), dtype)
        torch.testing.assert_close(again, dense, rtol=0, atol=0)


def test_quantisation_error_is_within_half_a_step():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 256, generator=g)
    blocks, scales = quantize_mxfp4(w)
    back = dequantize_mxfp4(blocks, scales, torch.float32)
    step = torch.ldexp(torch.ones(8, 8, 1), scales.long().view(8, 8, 1) - 127)  # 2^e: the widest e2m1 step is 2 * 2^e
    assert ((back - w).view(8, 8, 32).abs() <= step + 1e-12).all()
    assert set(torch.unique(back.view(8, 8, 32) / step).tolist()) <= set(FP4_E2M1)


def test_expert_weight_layout_round_trip():
    w = torch.randn(2, 64, 96)  # transformers (experts, in, out)
    blocks, scales = quantize_expert_weight(w)
    assert blocks.shape == (2, 96, 2, 16) and scales.shape == (2, 96, 2)  # checkpoint (experts, out, in/32, 16)
    back = dequantize_expert_weight(blocks, scales, torch.float32)
    assert back.shape == w.shape
    assert ((back - w).abs() / w.abs().amax()).max() < 0.2


def test_bad_width_is_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_mxfp4(torch.zeros(2, 48))
