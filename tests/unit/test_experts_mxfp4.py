"""Frozen MXFP4 experts: same math as transformers' eager experts on the dequantised weights, input
gradients only, 17/32 byte per weight, both checkpoint forms load, LoRA on attention trains."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import GptOssConfig  # noqa: E402
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts  # noqa: E402

from gptoss_cloud.contract.errors import GptossError  # noqa: E402
from gptoss_cloud.contract.shapes import ModelShape  # noqa: E402
from gptoss_cloud.contract.sections import MethodSection  # noqa: E402
from gptoss_cloud.trainer import model as M  # noqa: E402
from gptoss_cloud.trainer.kernels.experts_mxfp4 import Mxfp4Experts, mxfp4_experts_modules  # noqa: E402

SHAPE = ModelShape(name="t", num_hidden_layers=2, hidden_size=64, intermediate_size=32, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, vocab_size=128,
                   max_position_embeddings=256)


def _config(e=5, h=64, i=32, k=2):
    cfg = GptOssConfig(hidden_size=h, intermediate_size=i, num_local_experts=e, num_experts_per_tok=k,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=32)
    cfg._experts_implementation = "eager"
    return cfg


def _pair(seed=0):
    """(MXFP4 module, eager GptOssExperts holding exactly its dequantised weights), fp32."""
    cfg = _config()
    torch.manual_seed(seed)
    dense = GptOssExperts(cfg)
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0, 0.5)
    q = Mxfp4Experts.from_dense(dense)
    ref = GptOssExperts(cfg)
    with torch.no_grad():
        ref.gate_up_proj.copy_(q.dense_weight("gate_up_proj"))
        ref.down_proj.copy_(q.dense_weight("down_proj"))
        ref.gate_up_proj_bias.copy_(dense.gate_up_proj_bias)
        ref.down_proj_bias.copy_(dense.down_proj_bias)
    return cfg, q, ref


def _inputs(cfg, t=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, cfg.num_local_experts, generator=g)
    logits[:, 2] = -1e9  # an expert with no tokens
    top, idx = torch.topk(logits, cfg.num_experts_per_tok, dim=-1)
    return torch.randn(t, cfg.hidden_size, generator=g) * 3, idx, torch.softmax(top, -1)


@pytest.mark.parametrize("experts_per_chunk", [32, 2, 1])
def test_forward_and_input_gradient_match_eager_on_dequantised_weights(experts_per_chunk):
    cfg, q, ref = _pair()
    q.experts_per_chunk = experts_per_chunk  # whole layer at once, and the chunked (host-offsets) path
    x, idx, w = _inputs(cfg)
    outs = []
    for mod in (ref, q):
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = mod(xi, idx, wi)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append((out.detach(), xi.grad, wi.grad))
    for a, b in zip(outs[1], outs[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_only_activation_gradients_and_packed_weights_untouched():
    cfg, q, _ = _pair()
    before = {n: b.clone() for n, b in q.named_buffers()}
    x, idx, w = _inputs(cfg)
    x.requires_grad_(True)
    q(x, idx, w).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in q.parameters())
    assert not any(p.requires_grad for p in q.parameters())
    for n, b in q.named_buffers():
        assert b.dtype == torch.uint8 and torch.equal(b, before[n])


def test_packed_bytes_per_weight():
    q = Mxfp4Experts(num_experts=4, hidden_size=96, intermediate_size=64, alpha=1.702, limit=7.0)
    weights = 4 * (96 * 2 * 64 + 64 * 96)
    packed = sum(b.numel() * b.element_size() for b in q.buffers())
    assert packed / weights == 17 / 32  # 4 bits + one 8-bit scale per 32 values = 0.53125 byte/weight
    assert set(n for n, _ in q.named_buffers()) == {"gate_up_proj_blocks", "gate_up_proj_scales",
                                                   "down_proj_blocks", "down_proj_scales"}
    assert q.gate_up_proj_blocks.shape == (4, 128, 3, 16) and q.down_proj_scales.shape == (4, 96, 2)


def test_loads_released_layout_and_dense_checkpoints():
    cfg, q, ref = _pair()
    sd = q.state_dict()  # released names: *_blocks, *_scales, *_bias
    assert set(sd) == {"gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales",
                       "gate_up_proj_bias", "down_proj_bias"}
    fresh = Mxfp4Experts.from_config(cfg, bias_dtype=torch.float32)
    fresh.load_state_dict(sd)
    for n, b in q.named_buffers():
        assert torch.equal(getattr(fresh, n), b)
    # Dense (experts, in, out) tensors, as weights.py yields for a released folder: requantised exactly.
    dense_sd = {k: v for k, v in ref.state_dict().items()}
    fresh2 = Mxfp4Experts.from_config(cfg, bias_dtype=torch.float32)
    fresh2.load_state_dict(dense_sd)
    for name in ("gate_up_proj", "down_proj"):
        torch.testing.assert_close(fresh2.dense_weight(name), ref.state_dict()[name], rtol=0, atol=0)


def test_sizes_that_are_not_multiples_of_32_are_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        Mxfp4Experts(num_experts=2, hidden_size=48, intermediate_size=32, alpha=1.702, limit=7.0)


# ------------------------------------------------------------------------------------------ model level
def _model(base_format, device="cpu", seed=0):
    cfg = M.build_config(SHAPE, "eager", "eager")
    return cfg, M.create_model(cfg, torch.float32, device, seed=seed, base_format=base_format)


def _dense_state_dict(q):
    """q's state dict with each MXFP4 expert matrix replaced by its dequantised (E, in, out) tensor."""
    sd = dict(q.state_dict())
    for name, m in mxfp4_experts_modules(q):
        for w in ("gate_up_proj", "down_proj"):
            del sd[f"{name}.{w}_blocks"], sd[f"{name}.{w}_scales"]
            sd[f"{name}.{w}"] = m.dense_weight(w).contiguous()
    return sd


def test_model_with_mxfp4_experts_matches_dense_model_on_dequantised_weights():
    cfg, q = _model("mxfp4")
    assert len(mxfp4_experts_modules(q)) == SHAPE.num_hidden_layers
    assert not any(p.device.type == "meta" for p in q.parameters()) and all(b.device.type == "cpu" for b in q.buffers())
    _, dense = _model("bf16", seed=9)
    dense.load_state_dict(_dense_state_dict(q))
    ids = torch.randint(0, SHAPE.vocab_size, (2, 16))
    torch.testing.assert_close(q(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
    # seeded: every rank builds the same MXFP4 model
    _, again = _model("mxfp4")
    assert all(torch.equal(a, b) for a, b in zip(q.state_dict().values(), again.state_dict().values()))


def test_lora_on_attention_trains_with_mxfp4_experts():
    _, q = _model("mxfp4")
    q.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    q.train()
    lm = M.apply_method(q, MethodSection(kind="lora", lora={"r": 4, "alpha": 8}))
    ids = torch.randint(0, SHAPE.vocab_size, (1, 16))
    lm(input_ids=ids, labels=ids).loss.backward()
    trained = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    lora_b = [p for n, p in lm.named_parameters() if "lora_B" in n]  # lora_A's gradient is 0 while B is 0
    assert len(lora_b) == 4 * SHAPE.num_hidden_layers
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in lora_b)


@pytest.mark.parametrize("method", [
    {"kind": "lora", "lora": {"experts": True}},
    {"kind": "full"},
])
def test_methods_that_would_train_mxfp4_experts_are_refused(method):
    _, q = _model("mxfp4")
    with pytest.raises(GptossError, match="MXFP4"):
        M.apply_method(q, MethodSection(**method))


def test_meta_model_gets_packed_buffers_filled_by_random_init():
    cfg, q = _model("mxfp4", device="meta")
    q.to_empty(device="cpu")
    M.init_sharded_weights_(q, cfg.initializer_range, seed=3)
    m = mxfp4_experts_modules(q)[0][1]
    w = m.dense_weight("gate_up_proj")
    assert abs(float(w.std()) - cfg.initializer_range) < 0.2 * cfg.initializer_range
    assert float(m.gate_up_proj_bias.abs().sum()) == 0.0
    ids = torch.randint(0, SHAPE.vocab_size, (1, 8))
    assert torch.isfinite(q(ids).logits).all()


@pytest.mark.parametrize("released_layout", [True, False])
@pytest.mark.parametrize("keep_mxfp4", [True, False])
def test_pretrained_folder_loads_into_meta_mxfp4_model_like_the_trainer(tmp_path, released_layout, keep_mxfp4):
    """The trainer's pretrained path: a meta model, then load_state_dict(weights.load_state_dict(folder),
    strict=False, assign=True). A released-layout folder comes back with the same packed bytes, read
    packed (keep_mxfp4, what the trainer does for the mxfp4 base) or dequantised and packed again."""
    from safetensors.torch import save_file

    from gptoss_cloud.trainer.weights import load_state_dict

    cfg, src = _model("mxfp4", seed=5)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    if not released_layout:  # a bf16-style folder: dense expert tensors
        sd = _dense_state_dict(src)
    save_file(sd, str(tmp_path / "model.safetensors"))
    _, dst = _model("mxfp4", device="meta")
    weights = load_state_dict(tmp_path, torch.float32, keep_mxfp4=keep_mxfp4)
    if keep_mxfp4 and released_layout:  # nothing was dequantised on the way
        assert all(w.dtype == torch.uint8 for k, w in weights.items() if k.endswith(("_blocks", "_scales")))
        assert not any(k.endswith(("gate_up_proj", "down_proj")) for k in weights)
    missing, unexpected = dst.load_state_dict(weights, strict=False, assign=True)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    for (name, a), (_, b) in zip(mxfp4_experts_modules(src), mxfp4_experts_modules(dst)):
        for w in ("gate_up_proj", "down_proj"):
            torch.testing.assert_close(b.dense_weight(w), a.dense_weight(w), rtol=0, atol=0)
