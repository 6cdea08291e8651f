"""MXFP4 -> bf16/fp32 dequantisation as one Triton kernel (optional; GPU only in production).

The torch path (``mxfp4.dequantize_mxfp4``) widens every packed byte to an int32 index, gathers from a
table and multiplies: ~20 bytes of memory traffic per packed byte. This kernel reads the byte and its
group's scale once and writes the two values: ~5 bytes per packed byte (bf16 out). Decoding is
arithmetic (no table): code c = |nibble|: e = c >> 1, m = c & 1; value = m/2 if e == 0 else
(1 + m/2) * 2^(e-1); the scale 2^(s-127) is built from its exponent bits (exact; s = 0, i.e. groups
below 2^-126, flushes to zero). Same result as the torch path for scale codes 2..254 (codes 0-1 give |v| < 2^-125, which may flush to zero).

Used on CUDA whenever Triton is installed (``kernels.mxfp4_dequant: torch`` selects the torch path). Tested against the torch path on CPU
under ``TRITON_INTERPRET=1`` and on CUDA in tests/gpu.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dequant_kernel(blocks_ptr, scales_ptr, out_ptr, n_rows, BLOCK_R: tl.constexpr, NBYTES: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, NBYTES)
    mask = rows[:, None] < n_rows
    b = tl.load(blocks_ptr + rows[:, None] * NBYTES + cols[None, :], mask=mask, other=0).to(tl.int32)
    s = tl.load(scales_ptr + rows, mask=rows < n_rows, other=127).to(tl.int32)
    scale = (s << 23).to(tl.float32, bitcast=True)  # 2^(s - 127)

    lo = b & 0x0F
    hi = b >> 4
    vals = tl.join(lo, hi)  # (BLOCK_R, NBYTES, 2): low nibble is the even element
    c = vals & 7
    e = c >> 1
    m = (c & 1).to(tl.float32)
    mag = tl.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * (1 << e).to(tl.float32) * 0.5)
    v = tl.where(vals >= 8, -mag, mag) * scale[:, None, None]
    v = tl.reshape(v, (BLOCK_R, 2 * NBYTES))
    out_cols = tl.arange(0, 2 * NBYTES)
    tl.store(out_ptr + rows[:, None] * (2 * NBYTES) + out_cols[None, :], v.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_mxfp4_triton(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                            block_rows: int = 64) -> torch.Tensor:
    """Same contract as ``mxfp4.dequantize_mxfp4``: (..., G, B) uint8 + (..., G) uint8 -> (..., G*B*2)."""
    *prefix, groups, nbytes = blocks.shape
    rows = blocks.reshape(-1, nbytes).contiguous()
    sc = scales.reshape(-1).contiguous()
    out = torch.empty(rows.shape[0], nbytes * 2, dtype=dtype, device=blocks.device)
    if rows.shape[0]:
        _dequant_kernel[(triton.cdiv(rows.shape[0], block_rows),)](rows, sc, out, rows.shape[0], BLOCK_R=block_rows, NBYTES=nbytes)
    return out.reshape(*prefix, groups * nbytes * 2)
