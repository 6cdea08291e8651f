"""method.qat: mxfp4 on a CUDA GPU: the compiled fake quantisation (one fused kernel) is bit for bit the
eager torch one, at the 20b expert shape, and what it costs per layer (printed).

Run: pytest -m gpu tests/gpu/test_qat_gpu.py -s
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from gptoss_cloud.trainer.kernels import qat as Q  # noqa: E402
from support import cuda_ms  # noqa: E402

E, H, I = 32, 2880, 2880  # GPT-OSS-20b experts: gate_up (E, H, 2I), down (E, I, H)
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_fake_quant_is_the_eager_one_bit_for_bit_at_the_20b_shape(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    for shape in ((E, H, 2 * I), (E, I, H)):
        w = (torch.randn(shape, generator=g, device="cuda") * 0.02).to(dtype)
        w[0, :32, 0] = 0.0
        got = Q._quantizer(w, compiled=True)(w)
        want = Q.fake_quantize_mxfp4(w.cpu()).cuda()  # the CPU torch path the unit tests hold to the export
        assert torch.equal(got.view(BITS[dtype]), want.view(BITS[dtype])), shape
        eager_ms = cuda_ms(lambda: Q.fake_quantize_mxfp4(w))
        compiled_ms = cuda_ms(lambda: Q._quantizer(w, compiled=True)(w))
        gbytes = 2 * w.numel() * w.element_size() / 1e9  # read once, write once
        print(f"\nfake quant {tuple(shape)} {dtype}: compiled {compiled_ms:.2f} ms ({gbytes / compiled_ms:.0f} GB/s "
              f"counting one read and one write), eager {eager_ms:.2f} ms")
