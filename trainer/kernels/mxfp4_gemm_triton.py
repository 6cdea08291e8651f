"""Grouped GEMMs whose MXFP4 weights are decoded inside the GEMM's inner loop (Triton; GPU).

The dequantise-then-``grouped_mm`` path writes each expert matrix out in bf16 and reads it back: on an
H100 that was 41 of 237 ms of a 20b LoRA step (96 matrices at ~3.1 TB/s, the card's memory bandwidth).
Here each program loads its tile of packed bytes and scales, decodes them in registers (the arithmetic of
``mxfp4_triton``) and feeds ``tl.dot``: the bf16 matrix never exists in memory.

Rows of ``x`` are sorted by expert (``offsets``: cumulative row counts, as routing makes them). A
device-side schedule maps every M tile to its expert and first row, so nothing is read on the host.
Weights are ``W_e`` (out, in) packed along ``in`` (``blocks`` (E, out, in/32, 16), ``scales`` (E, out,
in/32)): ``nt`` computes ``x @ W_e.T`` (the forward), ``nn`` computes ``g @ W_e`` (the input gradient).

Opt-in with ``kernels.mxfp4_dequant: gemm`` until measured on a GPU; tested against the dequantising path
under ``TRITON_INTERPRET=1`` (tests/gpu/test_mxfp4_gemm_triton.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 64  # BLOCK_K: a multiple of the 32-value MXFP4 group


@triton.jit
def _decode(p, s, R: tl.constexpr, C: tl.constexpr):
    """Packed bytes (R, C/2) and e8m0 scales (R, C/32), both int32 -> (R, C) fp32 (low nibble first)."""
    vals = tl.join(p & 0x0F, p >> 4)  # (R, C/2, 2)
    c = vals & 7
    e = c >> 1
    m = (c & 1).to(tl.float32)
    mag = tl.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * (1 << e).to(tl.float32) * 0.5)
    v = tl.where(vals >= 8, -mag, mag)
    scale = (s << 23).to(tl.float32, bitcast=True)  # 2^(s - 127)
    v = tl.reshape(v, (R, C // 32, 32)) * scale[:, :, None]
    return tl.reshape(v, (R, C))


@triton.jit
def _tile_rows(tile_expert_ptr, tile_row_ptr, offsets_ptr, pid_m, E, BM: tl.constexpr):
    """This M tile's expert (E past the last tile) and its rows, masked to the expert's end."""
    e = tl.load(tile_expert_ptr + pid_m)
    rows = tl.load(tile_row_ptr + pid_m) + tl.arange(0, BM)
    row_end = tl.load(offsets_ptr + tl.minimum(e, E - 1))
    return e, rows, rows < row_end


@triton.jit
def _weight_tile(blocks_ptr, scales_ptr, wrow, wmask, k0, K: tl.constexpr, BC: tl.constexpr):
    """Decoded W[wrow, k0:k0+BC] (len(wrow), BC) in fp32, from the packed bytes and the group scales."""
    jb = k0 // 2 + tl.arange(0, BC // 2)
    p = tl.load(blocks_ptr + wrow[:, None] * (K // 2) + jb[None, :], mask=wmask[:, None], other=0).to(tl.int32)
    gs = k0 // 32 + tl.arange(0, BC // 32)
    s = tl.load(scales_ptr + wrow[:, None] * (K // 32) + gs[None, :], mask=wmask[:, None], other=127).to(tl.int32)
    return _decode(p, s, wrow.shape[0], BC)


@triton.jit
def _mxfp4_gmm_nt(x_ptr, blocks_ptr, scales_ptr, y_ptr, tile_expert_ptr, tile_row_ptr, offsets_ptr,
            N: tl.constexpr, K: tl.constexpr, E: tl.constexpr, stride_x, stride_y,
            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """y[rows of expert e] = x[rows] @ W_e.T, W_e (N, K)."""
    e, rows, rmask = _tile_rows(tile_expert_ptr, tile_row_ptr, offsets_ptr, tl.program_id(0), E, BM)
    if e < E:
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        cmask = cols < N
        wrow = (e * N + cols).to(tl.int64)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            a = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + ks[None, :], mask=rmask[:, None], other=0.0)
            w = _weight_tile(blocks_ptr, scales_ptr, wrow, cmask, k0, K, BK)
            acc += tl.dot(a, tl.trans(w.to(a.dtype)))
        out = y_ptr + rows[:, None].to(tl.int64) * stride_y + cols[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _mxfp4_gmm_nn(g_ptr, blocks_ptr, scales_ptr, out_ptr, tile_expert_ptr, tile_row_ptr, offsets_ptr,
            N: tl.constexpr, K: tl.constexpr, E: tl.constexpr, stride_g, stride_o,
            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out[rows of expert e] = g[rows] @ W_e, W_e (N, K); the reduction runs over N."""
    e, rows, rmask = _tile_rows(tile_expert_ptr, tile_row_ptr, offsets_ptr, tl.program_id(0), E, BM)
    if e < E:
        k0 = tl.program_id(1) * BK
        ks = k0 + tl.arange(0, BK)
        acc = tl.zeros((BM, BK), dtype=tl.float32)
        for n0 in range(0, N, BN):
            ns = n0 + tl.arange(0, BN)
            nmask = ns < N
            a = tl.load(g_ptr + rows[:, None].to(tl.int64) * stride_g + ns[None, :],
                        mask=rmask[:, None] & nmask[None, :], other=0.0)
            w = _weight_tile(blocks_ptr, scales_ptr, (e * N + ns).to(tl.int64), nmask, k0, K, BK)
            acc += tl.dot(a, w.to(a.dtype))
        out = out_ptr + rows[:, None].to(tl.int64) * stride_o + ks[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None])


def tile_schedule(offsets: torch.Tensor, num_rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert, first row) of every M tile, on the device: tiles never straddle two experts. The grid is
    sized from shapes only (rows / block_m + experts); tiles past the last expert get the sentinel E."""
    num_experts = offsets.shape[0]
    offs = offsets.long()
    counts = torch.diff(offs, prepend=offs.new_zeros(1))
    tiles = (counts + block_m - 1) // block_m
    ends = torch.cumsum(tiles, 0)
    t = torch.arange(triton.cdiv(num_rows, block_m) + num_experts, device=offsets.device)
    expert = torch.searchsorted(ends, t, right=True)
    e = expert.clamp(max=num_experts - 1)
    row = (offs[e] - counts[e]) + (t - (ends[e] - tiles[e])) * block_m
    return expert.to(torch.int32), row.to(torch.int32)


def mxfp4_grouped_mm_triton(x: torch.Tensor, offsets: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
                            transposed: bool) -> torch.Tensor:
    """Same contract as ``experts_mxfp4.mxfp4_grouped_mm``: ``x @ W_e.T`` (transposed) or ``x @ W_e``."""
    num_experts, n_out, groups, nbytes = blocks.shape
    k_in = groups * nbytes * 2
    if k_in % BLOCK_K:
        raise ValueError(f"MXFP4 GEMM: the packed dimension ({k_in}) must be a multiple of {BLOCK_K}")
    x = x.contiguous()
    blocks, scales, offsets = blocks.contiguous(), scales.contiguous(), offsets.to(torch.int32).contiguous()
    rows = x.shape[0]
    expert, row = tile_schedule(offsets, rows, BLOCK_M)
    if transposed:  # (S, K) @ W.T -> (S, N)
        y = torch.empty(rows, n_out, dtype=x.dtype, device=x.device)
        grid = (expert.shape[0], triton.cdiv(n_out, BLOCK_N))
        if rows:
            _mxfp4_gmm_nt[grid](x, blocks, scales, y, expert, row, offsets, n_out, k_in, num_experts, x.stride(0), y.stride(0),
                          BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K)
        return y
    out = torch.empty(rows, k_in, dtype=x.dtype, device=x.device)  # (S, N) @ W -> (S, K)
    grid = (expert.shape[0], k_in // BLOCK_K)
    if rows:
        _mxfp4_gmm_nn[grid](x, blocks, scales, out, expert, row, offsets, n_out, k_in, num_experts, x.stride(0), out.stride(0),
                      BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K)
    return out
