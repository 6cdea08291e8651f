"""MXFP4 <-> bf16/fp32 for the released GPT-OSS expert weights, in plain torch.

The published checkpoints store each expert matrix as ``<name>_blocks`` (uint8, two FP4 e2m1 values
per byte, low nibble first; shape ``(experts, rows, groups, 16)``, i.e. 32 values per group) and
``<name>_scales`` (uint8 e8m0 power-of-two exponents biased by 127, one per group of 32; shape
``(experts, rows, groups)``). Rows are the matrix's output features, so the dequantised
``(experts, rows, cols)`` tensor is transposed to transformers' ``(experts, in, out)`` parameter layout.
(Same table, bias and layout as transformers' integrations/mxfp4.py and the OCP MX format.)

transformers' own MXFP4 path fetches GPU kernels from the hub at run time, which cannot work offline;
this does the same arithmetic with torch ops, a bounded number of rows at a time.
"""

from __future__ import annotations

import torch

# The 16 FP4 e2m1 values, indexed by the 4-bit code (sign bit is the high bit of the nibble).
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127
GROUP = 32  # values per scale
FP4_MAX = 6.0
# Midpoints between consecutive non-negative e2m1 magnitudes (0, .5, 1, 1.5, 2, 3, 4, 6): rounding bounds.
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)

_BYTE_LUTS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _byte_lut(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(256, 2): both e2m1 values of every byte (low nibble first), so one gather decodes a byte."""
    key = (dtype, device)
    if key not in _BYTE_LUTS:
        fp4 = torch.tensor(FP4_E2M1, dtype=torch.float32)
        codes = torch.arange(256)
        _BYTE_LUTS[key] = torch.stack((fp4[codes & 0x0F], fp4[codes >> 4]), dim=-1).to(dtype=dtype, device=device)
    return _BYTE_LUTS[key]


def _check_packed(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8 (got {blocks.dtype}, {scales.dtype})")
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")


def _use_triton(impl: str) -> bool:
    """``kernels.mxfp4_dequant``: auto (default) = the Triton kernel when Triton is installed (2.2x the
    torch path end to end for 20b LoRA on an H100), ``triton`` or ``torch`` to choose. (``gemm`` decodes
    inside the grouped GEMM; whatever else dequantises whole experts does it as auto would.)"""
    if impl not in ("auto", "torch", "triton", "gemm"):
        raise ValueError(f"MXFP4 dequantisation must be auto, torch, triton or gemm, not {impl!r}")
    if impl in ("auto", "gemm"):
        import importlib.util

        return importlib.util.find_spec("triton") is not None
    return impl == "triton"


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16, rows_per_chunk: int = 1 << 20,
    impl: str = "auto",
) -> torch.Tensor:
    """Dequantise ``blocks`` (..., G, B) uint8 with ``scales`` (..., G) to (..., G * B * 2) in ``dtype``.

    Exact for bf16 and fp32: e2m1 values have 2 significant bits and the scale is a power of two
    (applied as an fp32 ``ldexp`` -> ``dtype`` multiplier, so the product never rounds). ``impl`` is
    ``kernels.mxfp4_dequant``; CPU tensors always take the torch path.
    """
    _check_packed(blocks, scales)
    if blocks.is_cuda and _use_triton(impl):
        from gptoss_cloud.trainer.kernels.mxfp4_triton import dequantize_mxfp4_triton  # one kernel, ~4x less memory traffic

        return dequantize_mxfp4_triton(blocks, scales, dtype)
    *prefix, groups, nbytes = blocks.shape
    rows = blocks.reshape(-1, nbytes)
    exps = scales.reshape(-1, 1).to(torch.int32) - SCALE_BIAS
    mult = torch.ldexp(torch.ones_like(exps, dtype=torch.float32), exps).to(dtype)
    lut = _byte_lut(dtype, blocks.device)
    out = torch.empty(rows.shape[0], nbytes * 2, dtype=dtype, device=blocks.device)
    # Chunked so the int32 index tensor of a 120b expert tensor never exists whole.
    for r0 in range(0, rows.shape[0], rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, rows.shape[0])
        vals = lut[rows[r0:r1].to(torch.int32)].view(r1 - r0, nbytes * 2)
        torch.mul(vals, mult[r0:r1], out=out[r0:r1])
    return out.reshape(*prefix, groups * nbytes * 2)


def dequantize_expert_weight(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """An expert tensor from the checkpoint's (experts, out, groups, 16) layout to transformers' (experts, in, out)."""
    return dequantize_mxfp4(blocks, scales, dtype).transpose(1, 2).contiguous()


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (..., K) with K a multiple of 32 -> (blocks (..., K/32, 16) uint8, scales (..., K/32) uint8).

    Per group of 32: the scale is the smallest power of two 2^e with max|w| / 2^e <= 6 (so nothing
    saturates), then each value rounds to the nearest e2m1 value, ties to the even code. Values already
    on the MXFP4 grid come back unchanged through dequantize(quantize(.)).
    """
    if w.shape[-1] % GROUP:
        raise ValueError(f"MXFP4 needs the last dimension to be a multiple of {GROUP} (got {tuple(w.shape)})")
    *prefix, k = w.shape
    g = w.detach().reshape(-1, k // GROUP, GROUP).float().contiguous()
    amax = g.abs().amax(dim=-1, keepdim=True)
    # ceil(log2(amax / 6)) via frexp (exact): amax/6 = m * 2^p with m in [0.5, 1) -> ceil is p, or p-1 when m == 0.5.
    mant, p = torch.frexp(amax / FP4_MAX)
    e = torch.where(mant == 0.5, p - 1, p)
    e = torch.where(amax > 0, e, torch.full_like(e, -SCALE_BIAS)).clamp(-SCALE_BIAS, SCALE_BIAS)
    mag = torch.ldexp(g.abs(), -e)  # exact: power-of-two scaling
    mids = torch.tensor(_MIDPOINTS, device=w.device)
    code = torch.bucketize(mag, mids)  # ties go to the lower code ...
    tie = (code < len(_MIDPOINTS)) & (mag == mids[code.clamp(max=len(_MIDPOINTS) - 1)]) & (code % 2 == 1)
    code = code + tie.to(code.dtype)  # ... unless that one is odd: ties to even
    code = code | ((g < 0) & (code > 0)).to(code.dtype) << 3
    code = code.to(torch.uint8).view(-1, k // GROUP, GROUP // 2, 2)
    blocks = code[..., 0] | (code[..., 1] << 4)
    scales = (e.squeeze(-1) + SCALE_BIAS).to(torch.uint8)
    return blocks.reshape(*prefix, k // GROUP, GROUP // 2), scales.reshape(*prefix, k // GROUP)


def quantize_expert_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' (experts, in, out) expert tensor -> the checkpoint's (experts, out, in/32, 16) blocks + scales."""
    return quantize_mxfp4(w.transpose(1, 2))
