"""The grouped-GEMM expert path (routing + permutation + clamped SwiGLU) against transformers' eager experts."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import GptOssConfig  # noqa: E402
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts  # noqa: E402

from gptoss_cloud.trainer.kernels import experts as X  # noqa: E402


def _config(e=6, h=64, i=32, k=2):
    cfg = GptOssConfig(hidden_size=h, intermediate_size=i, num_local_experts=e, num_experts_per_tok=k,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=32)
    cfg._experts_implementation = "eager"
    return cfg


def _experts(cfg, seed, dtype=torch.float32):
    torch.manual_seed(seed)
    m = GptOssExperts(cfg).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)  # large enough that the clamps at +-7 are hit
    return m


def _routing(t, e, k, seed, skip_expert=None):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g)
    if skip_expert is not None:
        logits[:, skip_expert] = -1e9  # an expert that gets no token
    top, idx = torch.topk(logits, k, dim=-1)
    return idx, torch.softmax(top, dim=-1)


def _run(fn, experts, x, idx, w):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    out = fn(experts, x, idx, w)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in experts.named_parameters()}
    experts.zero_grad()
    return out, x.grad, w.grad, grads


def test_fused_experts_match_eager_forward_and_gradients_fp32():
    cfg = _config()
    experts = _experts(cfg, seed=0)
    x = torch.randn(40, cfg.hidden_size) * 3
    idx, w = _routing(40, cfg.num_local_experts, cfg.num_experts_per_tok, seed=1, skip_expert=3)
    eager = type(experts).forward.__wrapped__  # transformers' eager loop, not the dispatcher
    ref = _run(eager, experts, x, idx, w)
    got = _run(X.fused_experts_forward, experts, x, idx, w)
    for a, b in zip(got[:3], ref[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for name in ref[3]:
        torch.testing.assert_close(got[3][name], ref[3][name], rtol=1e-5, atol=1e-5, msg=name)
    assert float(ref[3]["gate_up_proj"][3].abs().sum()) == 0.0  # the unused expert: no gradient in either


def test_clamped_swiglu_matches_transformers_gate_and_gradcheck():
    cfg = _config()
    experts = _experts(cfg, seed=0)
    h = (torch.randn(16, 2 * cfg.intermediate_size, dtype=torch.float64) * 6).requires_grad_(True)
    ref = experts._apply_gate(h)
    got = X.clamped_swiglu(h, experts.alpha, experts.limit)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    gref, = torch.autograd.grad(ref.sum() * 1.0 + (ref**2).sum(), h)
    ggot, = torch.autograd.grad(got.sum() * 1.0 + (got**2).sum(), h)
    torch.testing.assert_close(ggot, gref, rtol=1e-12, atol=1e-12)
    assert (h.detach().abs() > experts.limit).any()  # the clamps were exercised
    torch.autograd.gradcheck(lambda t: X.clamped_swiglu(t, 1.702, 7.0), (h.detach()[:4].clone().requires_grad_(True),))


def test_routing_is_sorted_and_offsets_count_pairs():
    idx = torch.tensor([[2, 0], [2, 1], [0, 2]])
    r = X.route(idx, num_experts=4)
    assert r.expert_ids.tolist() == [0, 0, 1, 2, 2, 2]
    assert r.offsets.tolist() == [2, 3, 6, 6] and r.offsets.dtype == torch.int32
    assert r.token_idx.tolist() == [0, 2, 1, 0, 1, 2]  # stable within an expert
    y = torch.arange(6.0).unsqueeze(-1)
    assert X.unpermute_sum(y, r, 3, 2).squeeze(-1).tolist() == [3.0 + 0.0, 4.0 + 2.0, 1.0 + 5.0]


def test_registered_implementation_runs_inside_transformers_model():
    from transformers import GptOssForCausalLM

    name = X.register()
    cfg = _config()
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = GptOssForCausalLM(cfg).float()
    ids = torch.randint(0, 32, (2, 12))
    ref = model(ids).logits
    model.config._experts_implementation = name
    calls = []
    orig = X.experts_forward
    X.experts_forward = lambda *a, **kw: calls.append(1) or orig(*a, **kw)
    try:
        got = model(ids).logits
    finally:
        X.experts_forward = orig
    assert len(calls) == cfg.num_hidden_layers  # our path ran, not transformers' eager loop
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_lora_on_experts_trains_the_same_through_the_fused_path():
    """method.lora.experts wraps the 3-D expert weights with peft's parametrization (W + B·A at each
    access): the fused path must see it, giving eager's loss and the same LoRA gradients."""
    from peft import LoraConfig, get_peft_model
    from transformers import GptOssForCausalLM

    name = X.register()
    cfg = _config()
    cfg._attn_implementation = "eager"
    ids = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(3))
    out = {}
    for impl in ("eager", name):
        torch.manual_seed(0)
        model = GptOssForCausalLM(cfg).float()
        model.config._experts_implementation = impl
        lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                          target_parameters=["layers.0.mlp.experts.gate_up_proj", "layers.0.mlp.experts.down_proj"])
        model = get_peft_model(model, lcfg)
        with torch.no_grad():  # B starts at zero: nudge it so the experts' adapters change the output
            for i, (n, p) in enumerate(model.named_parameters()):
                if "lora_B" in n:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(i))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and "experts" in n}
        out[impl] = (loss.detach(), grads)
    (l_ref, g_ref), (l_got, g_got) = out["eager"], out[name]
    assert len(g_ref) == 4 and all(float(g.abs().sum()) > 0 for g in g_ref.values())  # A and B of both matrices
    torch.testing.assert_close(l_got, l_ref, rtol=1e-5, atol=1e-5)
    for n in g_ref:
        torch.testing.assert_close(g_got[n], g_ref[n], rtol=1e-4, atol=1e-5, msg=n)
