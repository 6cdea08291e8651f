"""MXFP4 -> bf16 dequantisation of the released GPT-OSS expert weights, in plain torch.

The published checkpoints store each expert matrix as ``<name>_blocks`` (uint8, two FP4 e2m1 values
per byte, low nibble first; shape ``(experts, rows, groups, 16)``, i.e. 32 values per group) and
``<name>_scales`` (uint8 power-of-two exponents biased by 127, one per group of 32; shape
``(experts, rows, groups)``). Rows are the matrix's output features, so the dequantised
``(experts, rows, cols)`` tensor is transposed to transformers' ``(experts, in, out)`` parameter layout.

transformers' own MXFP4 path fetches GPU kernels from the hub at run time, which cannot work offline;
this does the same arithmetic with torch ops, a bounded number of rows at a time.
"""

from __future__ import annotations

import torch

# The 16 FP4 e2m1 values, indexed by the 4-bit code (sign bit is the high bit of the nibble).
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16, rows_per_chunk: int = 1 << 20
) -> torch.Tensor:
    """Dequantise ``blocks`` (..., G, B) uint8 with ``scales`` (..., G) to (..., G * B * 2) in ``dtype``."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8 (got {blocks.dtype}, {scales.dtype})")
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    *prefix, groups, nbytes = blocks.shape
    rows = blocks.reshape(-1, nbytes)
    exps = scales.reshape(-1, 1).to(torch.int32) - SCALE_BIAS
    lut = torch.tensor(FP4_E2M1, dtype=torch.float32, device=blocks.device)
    out = torch.empty(rows.shape[0], nbytes * 2, dtype=dtype, device=blocks.device)
    # Chunked so a 120b expert tensor never needs its int index tensors whole at once.
    for r0 in range(0, rows.shape[0], rows_per_chunk):
        blk = rows[r0:r0 + rows_per_chunk]
        vals = torch.stack((lut[(blk & 0x0F).long()], lut[(blk >> 4).long()]), dim=-1).flatten(-2)
        # ldexp is exact for powers of two in fp32; the cast to bf16 is exact for e2m1 x 2^k in range.
        out[r0:r0 + rows_per_chunk] = torch.ldexp(vals, exps[r0:r0 + rows_per_chunk].float()).to(dtype)
    return out.reshape(*prefix, groups * nbytes * 2)


def dequantize_expert_weight(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """An expert tensor from the checkpoint's (experts, out, groups, 16) layout to transformers' (experts, in, out)."""
    return dequantize_mxfp4(blocks, scales, dtype).transpose(1, 2).contiguous()
