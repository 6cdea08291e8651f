"""parallelism.expert_units on a CUDA GPU at the 120b expert shape (128 experts): the split module through
torch's grouped GEMM in bf16 gives the fused module's outputs and gradients, a unit that no token reaches
included, and under a compiled decoder layer.

Tolerance: both sides run the same bf16 grouped GEMMs on the same rows, the split one in row ranges per
unit; cuBLAS may block a shorter row range differently, so the results can differ by bf16 rounding of the
fp32-accumulated products: |diff| <= 2^-8 |ref| + a few ulps of the output's scale, asserted as
rtol 1.6e-2 / atol 1e-2 x max|ref|.

Run: pytest -m gpu tests/gpu/test_expert_units_gpu.py
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from transformers import GptOssConfig  # noqa: E402
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts  # noqa: E402

from gptoss_cloud.trainer.kernels import experts as X  # noqa: E402
from gptoss_cloud.trainer.kernels import expert_units as U  # noqa: E402

E, H, I, K = 128, 2880, 2880, 4  # GPT-OSS-120b experts


def _experts():
    cfg = GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K,
                       num_hidden_layers=1, num_attention_heads=64, num_key_value_heads=8, head_dim=64)
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = GptOssExperts(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    return m


def _check(a, b, what):
    scale = float(b.float().abs().max())
    torch.testing.assert_close(a.float(), b.float(), rtol=1.6e-2, atol=1e-2 * scale, msg=what)


@pytest.mark.parametrize("compiled", [False, True])
def test_split_experts_match_fused_on_cuda(compiled):
    dense = _experts()
    t = 2048
    x = torch.randn(t, H, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(t, E, device="cuda")
    logits[:, 96:] = -1e9  # the last unit of 4 gets no token
    top, idx = torch.topk(logits, K, dim=-1)
    w = torch.softmax(top, -1).to(torch.bfloat16)
    g = torch.randn(t, H, device="cuda", dtype=torch.bfloat16)

    xr = x.clone().requires_grad_(True)
    ref = X.fused_experts_forward(dense, xr, idx, w)
    (ref.float() * g.float()).sum().backward()
    split = U.SplitExperts(dense, 4)
    fn = torch.compile(lambda a: split(a, idx, w) * 1.0) if compiled else (lambda a: split(a, idx, w))
    xs = x.clone().requires_grad_(True)
    out = fn(xs)
    (out.float() * g.float()).sum().backward()
    _check(out, ref, "output")
    _check(xs.grad, xr.grad, "input gradient")
    for p in U.PARAMS:
        got = torch.cat([getattr(u, p).grad for u in split.units])
        _check(got, getattr(dense, p).grad, p)
    assert float(split.units[3].gate_up_proj.grad.abs().sum()) == 0.0
