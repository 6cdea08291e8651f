"""Which byte-level properties the MXFP4 round trip has, stated exactly (the export relies on them).

Values: dequant(quant(dequant(b, s))) == dequant(b, s) for every finite MXFP4 tensor (test_mxfp4_quant.py).
Bytes: quant picks the smallest power-of-two scale that does not saturate, so requantising an MXFP4
tensor gives its canonical encoding, which may differ from the bytes it started from:

- a group whose largest magnitude code is below 4.0 (codes 0-5) is re-encoded one scale lower with its
  codes doubled, and a negative-zero nibble (0x8) becomes +0 (0x0): same values, other bytes;
- the canonical encoding is a fixed point: quant(dequant(c)) == c byte for byte.

quant(w) of a dense w is canonical except in the groups whose largest |w| rounds *down* to 3 x 2^e
(|w|max / 2^e in (3, 3.5)): so quant(dequant(quant(w))) == quant(w) holds group by group exactly where
quant(w)'s largest code is 4.0 or 6.0. Hence the export copies an untouched expert's bytes instead of
requantising its dequantised weights: the values would agree, the bytes need not.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from gptoss_cloud.trainer.kernels.mxfp4 import dequantize_mxfp4, quantize_mxfp4  # noqa: E402


def _roundtrip(blocks, scales):
    return quantize_mxfp4(dequantize_mxfp4(blocks, scales, torch.float32))


def _max_code(blocks):
    """The largest magnitude code (0..7, e2m1 0..6.0) of each group."""
    return torch.maximum(blocks & 0x07, (blocks >> 4) & 0x07).amax(-1)


def test_the_canonical_encoding_is_a_fixed_point():
    g = torch.Generator().manual_seed(11)
    blocks = torch.randint(0, 256, (3, 40, 4, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(110, 140, (3, 40, 4), generator=g, dtype=torch.uint8)
    once = _roundtrip(blocks, scales)
    twice = _roundtrip(*once)
    assert torch.equal(twice[0], once[0]) and torch.equal(twice[1], once[1])
    torch.testing.assert_close(dequantize_mxfp4(*once, torch.float32), dequantize_mxfp4(blocks, scales, torch.float32),
                               rtol=0, atol=0)


def test_requantising_changes_exactly_the_non_canonical_groups():
    g = torch.Generator().manual_seed(12)
    nibbles = torch.randint(0, 15, (2, 64, 4, 32), generator=g, dtype=torch.uint8)
    nibbles += (nibbles >= 8).to(torch.uint8)  # every code but 0x8 (negative zero) ...
    groups = nibbles.shape[:-1]
    neg_zero = torch.rand(groups, generator=g) < 0.2
    nibbles[..., 0][neg_zero] = 0x8  # ... which a fifth of the groups get once
    small = torch.rand(groups, generator=g) < 0.3
    nibbles[small] &= 0xB  # clears bit 2: magnitude codes 0-3 (<= 1.5) in a third of the groups
    blocks = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    scales = torch.randint(110, 140, groups, generator=g, dtype=torch.uint8)
    b2, s2 = _roundtrip(blocks, scales)
    differs = (b2 != blocks).any(-1) | (s2 != scales)
    has_neg_zero = (((blocks & 0x0F) == 0x08) | ((blocks >> 4) == 0x08)).any(-1)
    nonzero = _max_code(blocks) > 0
    assert torch.equal(differs, (_max_code(blocks) < 6) | has_neg_zero)
    lowered = differs & ~has_neg_zero & nonzero
    assert lowered.sum() > 10 and (differs & (_max_code(blocks) >= 6)).sum() > 0  # both kinds occur here
    # Where only the scale moved, it moved down by exactly one (canonical) or more (codes <= 1.5 need more).
    assert ((scales.int() - s2.int())[lowered] >= 1).all()


def test_quantising_a_dense_tensor_is_canonical_except_where_its_max_rounds_down_to_three():
    g = torch.Generator().manual_seed(13)
    w = torch.randn(64, 32 * 64, generator=g)
    b1, s1 = quantize_mxfp4(w)
    b2, s2 = _roundtrip(b1, s1)
    differs = (b2 != b1).any(-1) | (s2 != s1)
    assert torch.equal(differs, _max_code(b1) < 6)  # 6 is the code of 4.0
    # The band that rounds down: |w|max / 2^e in (3, 3.5), about 1/6 of the groups for Gaussian weights.
    amax = w.view(64, 64, 32).abs().amax(-1)
    ratio = amax / torch.ldexp(torch.ones_like(amax), s1.long() - 127)
    assert torch.equal(differs, (ratio > 3) & (ratio < 3.5))
    assert 0.05 < differs.float().mean() < 0.3
    assert torch.equal((s1.int() - s2.int())[differs], torch.ones(int(differs.sum()), dtype=torch.int32))
    again = quantize_mxfp4(dequantize_mxfp4(b2, s2, torch.float32))
    assert torch.equal(again[0], b2) and torch.equal(again[1], s2)


def test_the_exports_sliced_quantiser_writes_the_bytes_of_the_whole_tensor_quantiser():
    """Groups never straddle a slice (each is 32 input features of one output row), so slicing is exact."""
    from gptoss_cloud.trainer.kernels.mxfp4 import quantize_expert_weight
    from gptoss_cloud.trainer.merge.mxfp4 import quantize_in_chunks

    w = torch.randn(3, 64, 40, generator=torch.Generator().manual_seed(14))  # (experts, in, out)
    whole = quantize_expert_weight(w)
    for max_elems in (1, 64 * 7, 1 << 22):  # one row, 7 rows (40 is no multiple of 7), whole experts
        sliced = quantize_in_chunks(w, max_elems=max_elems)
        assert torch.equal(sliced[0], whole[0]) and torch.equal(sliced[1], whole[1])
