"""method.qat: mxfp4 — the fake quantisation is the export's round trip bit for bit, its gradient is
straight through, and every experts implementation (eager, grouped_mm, fused; LoRA on the experts)
computes on exactly the weights the MXFP4 export writes.

Equality here is exact (``torch.equal``, or the bit patterns): the fake-quantised forward and the
plain forward over the exported (rounded) weights run the same kernels on the same values in the
same order, so nothing may differ by even one ulp.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from gptoss_cloud.contract.shapes import TINY  # noqa: E402
from gptoss_cloud.contract.sections import KernelsSection, LoraSection, MethodSection  # noqa: E402
from gptoss_cloud.trainer import model as M  # noqa: E402
from gptoss_cloud.trainer.kernels import qat as Q  # noqa: E402
from gptoss_cloud.trainer.kernels.mxfp4 import dequantize_expert_weight, quantize_expert_weight  # noqa: E402

SHAPE = replace(TINY, vocab_size=512)
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


def _export_round_trip(w: torch.Tensor) -> torch.Tensor:
    """What the MXFP4 export writes for an (E, in, out) weight, decoded again."""
    return dequantize_expert_weight(*quantize_expert_weight(w), w.dtype)


def _hard_weights(dtype: torch.dtype) -> torch.Tensor:
    """(4, 128, 96): magnitudes 1e-30..1e30 across columns, an all-zero group, negative zeros, every
    rounding tie of the e2m1 grid (and their negatives), fp32 subnormals."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 128, 96, generator=g) * torch.logspace(-30, 30, 96).view(1, 1, 96)
    w[0, :32, 0] = 0.0
    w[1, :32, 1] = -0.0
    ties = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    w[2, :32, 2] = torch.tensor(ties + [-t for t in ties] + [0.1, -0.1] + [0.0] * 14)
    w[3, :, 3] = 1e-40
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quant_is_the_export_round_trip_bit_for_bit(dtype):
    w = _hard_weights(dtype)
    got, want = Q.fake_quantize_mxfp4(w), _export_round_trip(w)
    assert got.dtype == dtype and got.shape == w.shape
    assert torch.equal(got.view(BITS[dtype]), want.view(BITS[dtype]))  # bit patterns: -0.0 would show
    # The axis matters: groups along the output dimension give other values (so this test can fail).
    assert not torch.equal(Q.fake_quantize_mxfp4(w, dim=2), want)


def test_fake_quant_refuses_a_dimension_that_is_not_whole_groups():
    with pytest.raises(ValueError, match="groups 32 values along dimension 1"):
        Q.fake_quantize_mxfp4(torch.zeros(2, 48, 64))


def test_straight_through_gradient_is_the_identity():
    w = torch.randn(2, 64, 32, requires_grad=True)
    g = torch.randn(2, 64, 32)
    (Q.fake_quantize_ste(w) * g).sum().backward()
    assert torch.equal(w.grad, g)


def test_export_dtype_is_the_dtype_the_run_computed_in():
    # fp32 masters of a bf16 run: the export quantises the bf16 value, and so must the forward. A group
    # whose maximum rounds onto 6 * 2^e in bf16 gets scale 2^e there but 2^(e+1) from the fp32 value.
    w = torch.zeros(1, 32, 1)
    w[0, 0, 0], w[0, 1, 0] = 6.01, 0.5  # 0.5: kept at scale 1, a tie rounded to 0 at scale 2
    cfg = type("Cfg", (), {"dtype": torch.bfloat16})()
    dtype = Q.export_dtype(cfg, torch.float32)
    assert dtype == torch.bfloat16 and Q.export_dtype(type("Cfg", (), {"dtype": "float32"})(), torch.bfloat16) == torch.float32
    assert not torch.equal(Q.fake_quantize_mxfp4(w.to(dtype)).float(), Q.fake_quantize_mxfp4(w))


# ------------------------------------------------------------------------------------- in the model
def _model(experts: str, seed: int = 0):
    attn, impl = M.resolve_implementations(KernelsSection(attention="eager", experts=experts), "cpu")
    model = M.create_model(M.build_config(SHAPE, attn, impl), torch.float32, "cpu", seed=seed)
    with torch.no_grad():  # expert weights large enough that MXFP4 rounding changes the loss visibly
        for name, p in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.normal_(0, 0.3)
    return model


def _rounded(model):
    """The model as the MXFP4 export writes it: every expert matrix through quantise -> dequantise."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.copy_(_export_round_trip(p))
    return out


def _loss(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, labels=ids, use_cache=False).loss


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("experts", ["eager", "grouped_mm", "fused"])
def test_qat_forward_and_gradients_are_those_of_the_exported_weights(experts):
    """Loss: the plain model over the rounded weights. Gradients (STE): that model's gradients, for the
    expert matrices too, which means the QAT weights follow the gradient evaluated at the quantised point."""
    base = _model(experts)
    ids = torch.randint(0, SHAPE.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    qat = M.apply_method(copy.deepcopy(base), MethodSection(kind="full", qat="mxfp4"))
    assert qat.config._experts_implementation == Q.QAT_PREFIX + M.EXPERTS_IMPLS[experts]
    ref = M.apply_method(_rounded(base), MethodSection(kind="full"))
    (l_qat, g_qat), (l_ref, g_ref) = _loss_and_grads(qat, ids), _loss_and_grads(ref, ids)
    l_dense = _loss(base, ids)
    assert torch.equal(l_qat, l_ref) and not torch.equal(l_qat, l_dense)
    assert g_qat.keys() == g_ref.keys() and any(k.endswith("experts.down_proj") for k in g_qat)
    for k in g_ref:
        assert torch.equal(g_qat[k], g_ref[k]), k
    # The parameters themselves stay dense and the module keeps its names (checkpoints, merge, FSDP).
    assert qat.state_dict().keys() == base.state_dict().keys()
    assert torch.equal(qat.model.layers[0].mlp.experts.down_proj, base.model.layers[0].mlp.experts.down_proj)


def test_qat_with_lora_on_experts_rounds_base_plus_delta():
    """peft's delta is added before the rounding: the loss is the merged model's, rounded. Adapter values
    are multiples of 1/16 with at most 4 terms per product sum, so W + delta is exact both in peft's
    forward (baddbmm) and in its merge (W + einsum), and the comparison can be exact."""
    base = _model("eager")
    ids = torch.randint(0, SHAPE.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    method = dict(kind="lora", lora=LoraSection(r=4, alpha=8, experts=True))
    qat = M.apply_method(copy.deepcopy(base), MethodSection(qat="mxfp4", **method))
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for n, p in qat.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randint(-1, 2, p.shape, generator=g).float() / 16)
    plain = M.apply_method(copy.deepcopy(base), MethodSection(**method))
    plain.load_state_dict(qat.state_dict())
    merged = plain.merge_and_unload()
    assert merged.config._experts_implementation == "eager"
    l_qat, grads = _loss_and_grads(qat, ids)
    l_merged_rounded = _loss(_rounded(merged), ids)
    assert torch.equal(l_qat, l_merged_rounded)
    # The rounding is of base + delta, not of the base with the delta added after it.
    l_base_rounded_plus_delta = _loss(_with_adapters(_rounded(base), qat, method), ids)
    assert not torch.equal(l_qat, l_base_rounded_plus_delta)
    assert all(grads[k].abs().max() > 0 for k in grads if "experts" in k and "lora_" in k)


def _with_adapters(base, trained, method):
    m = M.apply_method(base, MethodSection(**method))
    m.load_state_dict({k: v for k, v in trained.state_dict().items() if "lora_" in k}, strict=False)
    return m


def test_enabling_twice_keeps_one_wrapper():
    model = _model("eager")
    name = M.enable_qat_(model)
    assert M.enable_qat_(model) == name == Q.QAT_PREFIX + "eager"
