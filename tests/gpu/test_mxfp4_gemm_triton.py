"""The grouped GEMM that decodes MXFP4 weights inside its inner loop (kernels/mxfp4_gemm_triton.py).

Under TRITON_INTERPRET=1 (any machine with Triton) the kernel's scheduling, masking and decoding are
checked in fp32 against the dequantising path; on a CUDA GPU the compiled kernel is checked in bf16
at the 20b expert shape, forward and input gradient, and its time is printed beside the dequantising
path's. Run: pytest -m gpu tests/gpu/test_mxfp4_gemm_triton.py -s
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu  # GPU machines, which have Triton (collected but deselected elsewhere)

CHECK = textwrap.dedent("""
    import torch
    from gptoss_cloud.trainer.kernels.experts import grouped_mm_loop
    from gptoss_cloud.trainer.kernels.mxfp4 import dequantize_mxfp4
    from gptoss_cloud.trainer.kernels.mxfp4_gemm_triton import mxfp4_grouped_mm_triton, tile_schedule
    g = torch.Generator().manual_seed(0)
    E, N, K = 3, 96, 128  # N not a multiple of the tile (masked columns)
    blocks = torch.randint(0, 256, (E, N, K // 32, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(120, 130, (E, N, K // 32), generator=g, dtype=torch.uint8)
    counts = torch.tensor([70, 0, 45])  # an expert with no rows; tiles that end mid-way
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    S = int(counts.sum())
    expert, row = tile_schedule(offsets, S, 64)
    assert expert.tolist() == [0, 0, 2, 3, 3] and row.tolist()[:3] == [0, 64, 70], (expert, row)
    W = dequantize_mxfp4(blocks, scales, torch.float32, impl="torch")  # (E, N, K)
    x = torch.randn(S, K, generator=g)
    y = mxfp4_grouped_mm_triton(x, offsets, blocks, scales, True)
    ref = grouped_mm_loop(x, W.transpose(1, 2), offsets)
    assert y.shape == (S, N) and (y - ref).abs().max() <= 1e-4 * ref.abs().max()
    gy = torch.randn(S, N, generator=g)
    gx = mxfp4_grouped_mm_triton(gy, offsets, blocks, scales, False)
    ref = grouped_mm_loop(gy, W, offsets)
    assert gx.shape == (S, K) and (gx - ref).abs().max() <= 1e-4 * ref.abs().max()
    print("ok")
""")


def test_decoding_gemm_matches_dequantising_path_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decoding_gemm_bf16_at_the_20b_shape_and_timing():
    from gptoss_cloud.trainer.kernels.experts import route
    from gptoss_cloud.trainer.kernels.experts_mxfp4 import mxfp4_grouped_mm
    from gptoss_cloud.trainer.kernels.mxfp4_gemm_triton import mxfp4_grouped_mm_triton

    E, H, I, T, K = 32, 2880, 2880, 4096, 4
    g = torch.Generator(device="cuda").manual_seed(0)
    blocks = torch.randint(0, 256, (E, 2 * I, H // 32, 16), generator=g, device="cuda", dtype=torch.uint8)
    scales = torch.randint(118, 124, (E, 2 * I, H // 32), generator=g, device="cuda", dtype=torch.uint8)
    r = route(torch.randint(0, E, (T, K), generator=g, device="cuda"), E)
    x = torch.randn(T * K, H, generator=g, device="cuda", dtype=torch.bfloat16)
    gy = torch.randn(T * K, 2 * I, generator=g, device="cuda", dtype=torch.bfloat16)
    # The reference: dequantise (kernels.mxfp4_dequant: auto), then torch's grouped GEMM.
    ref_y = mxfp4_grouped_mm(x, r.offsets, blocks, scales, True, E, "auto")
    ref_gx = mxfp4_grouped_mm(gy, r.offsets, blocks, scales, False, E, "auto")
    y = mxfp4_grouped_mm_triton(x, r.offsets, blocks, scales, True)
    gx = mxfp4_grouped_mm_triton(gy, r.offsets, blocks, scales, False)
    for got, ref in ((y, ref_y), (gx, ref_gx)):
        rel = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        assert rel < 1e-2, rel

    from support import cuda_ms

    t_ref = cuda_ms(lambda: (mxfp4_grouped_mm(x, r.offsets, blocks, scales, True, E),
                        mxfp4_grouped_mm(gy, r.offsets, blocks, scales, False, E)))
    t_new = cuda_ms(lambda: (mxfp4_grouped_mm_triton(x, r.offsets, blocks, scales, True),
                        mxfp4_grouped_mm_triton(gy, r.offsets, blocks, scales, False)))
    print(f"\n20b gate_up, {T * K} routed rows, forward + input gradient: dequantise + grouped_mm {t_ref:.2f} ms, "
          f"decode in the GEMM {t_new:.2f} ms")
