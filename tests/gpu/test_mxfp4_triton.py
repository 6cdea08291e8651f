"""The optional Triton MXFP4 dequantiser against the torch one, under Triton's CPU interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

# Triton comes with CUDA builds of torch: this runs with the GPU tests (pytest -m gpu), under Triton's
# interpreter so it checks the kernel's arithmetic bit for bit against the torch path.
pytestmark = pytest.mark.gpu

CHECK = textwrap.dedent("""
    import torch
    from gptoss_cloud.trainer.kernels.mxfp4 import dequantize_mxfp4
    from gptoss_cloud.trainer.kernels.mxfp4_triton import dequantize_mxfp4_triton
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 70, 2, 16), generator=g, dtype=torch.uint8)  # 420 rows: a partial last tile
    scales = torch.randint(2, 250, (3, 70, 2), generator=g, dtype=torch.uint8)
    for dt in (torch.float32, torch.bfloat16):
        a, b = dequantize_mxfp4_triton(blocks, scales, dt), dequantize_mxfp4(blocks, scales, dt, impl="torch")
        assert a.shape == b.shape == (3, 70, 64) and a.dtype == dt, (a.shape, a.dtype)
        assert torch.equal(a, b), (a.float() - b.float()).abs().max()
    print("ok")
""")


def test_triton_dequant_matches_torch_path_bit_for_bit():
    env = dict(os.environ, TRITON_INTERPRET="1")  # the reference: the torch path (impl="torch")
    res = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]
