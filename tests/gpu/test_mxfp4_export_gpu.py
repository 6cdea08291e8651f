"""The MXFP4 export's quantiser on a CUDA GPU: the same bytes as on the host, and how many weights a second
each device quantises at the 20b expert shape (printed; the export of trained experts is bound by it).

Run: pytest -m gpu tests/gpu/test_mxfp4_export_gpu.py -s
"""

from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from gptoss_cloud.trainer.merge.mxfp4 import quantize_in_chunks  # noqa: E402

E, H, I = 32, 2880, 2880  # GPT-OSS-20b experts: gate_up (E, H, 2I), down (E, I, H)


def test_gpu_quantises_to_the_host_bytes():
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(2, H, 2 * I, generator=g) * 0.02).to(torch.bfloat16)
    w[0, :32, 0] = 0.0                       # an all-zero group
    w[1, :32, 1] = torch.tensor([6.0, -3.5, 0.25, 1.75] * 8)  # ties and the saturation edge
    cpu = quantize_in_chunks(w, device="cpu")
    gpu = quantize_in_chunks(w, device="cuda")
    assert gpu[0].device.type == "cpu"       # codes come back to the weight's device
    assert torch.equal(cpu[0], gpu[0]) and torch.equal(cpu[1], gpu[1])


def test_throughput_at_the_20b_layer_shape():
    w = (torch.randn(E, H, 2 * I) * 0.02).to(torch.bfloat16)   # one 20b layer's gate_up, on the host as the merge reads it
    for device in ("cuda", "cpu"):
        part = w if device == "cuda" else w[:2]
        quantize_in_chunks(part[:1], device=device)  # warm up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        quantize_in_chunks(part, device=device)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        print(f"\n{device}: {part.numel() / dt / 1e6:,.0f} M weights/s ({torch.get_num_threads()} host threads)")
