"""GPT-OSS build, packed attention, kernels and LoRA on tiny shapes (small vocabulary: it is not the point here)."""

from __future__ import annotations

from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")

from gptoss_cloud.contract.shapes import TINY  # noqa: E402
from gptoss_cloud.contract.sections import KernelsSection, MethodSection  # noqa: E402
from gptoss_cloud.trainer import causal_lm as LM  # noqa: E402
from gptoss_cloud.trainer import model as M  # noqa: E402
from gptoss_cloud.trainer.data.pack import PackedSample  # noqa: E402

SHAPE = replace(TINY, vocab_size=512, sliding_window=4)  # a small window so sliding layers differ from full


Sample = PackedSample  # the data pipeline's own packed row


def _model(attn="eager", experts="eager", seed=0):
    cfg = M.build_config(SHAPE, attn, experts)
    return LM.CausalLMWithChunkedLoss(M.create_model(cfg, torch.float32, seed=seed), chunk_tokens=5), cfg


def _segment(n, g):
    ids = torch.randint(0, SHAPE.vocab_size, (n,), generator=g).tolist()
    labels = [(-100 if i < n // 3 else t) for i, t in enumerate(ids)]  # a prompt part that is not trained
    return ids, labels


def _pack(segs, length):
    ids, labels, pos, lens = [], [], [], []
    for s_ids, s_labels in segs:
        ids += s_ids
        labels += s_labels
        pos += list(range(len(s_ids)))
        lens.append(len(s_ids))
    pad = length - len(ids)
    ids += [0] * pad
    labels += [-100] * pad
    pos += list(range(pad))
    lens.append(pad)
    return Sample(ids, labels, pos, lens)


def test_resolve_implementations():
    assert M.resolve_implementations(KernelsSection(), "cpu") == ("eager", "eager")
    assert M.resolve_implementations(KernelsSection(), "cuda") == ("gptoss_flex", "gptoss_fused")  # the fast paths
    assert M.compile_enabled(KernelsSection(), "cuda") and not M.compile_enabled(KernelsSection(), "cpu")
    assert not M.compile_enabled(KernelsSection(compile=False), "cuda")
    from gptoss_cloud.contract.spec import RunSpec

    cpu = torch.device("cpu")  # auto keeps every activation on CPU; explicit settings are kept as given
    assert M.resolve_recompute(RunSpec(), cpu) is False
    assert M.resolve_recompute(RunSpec.model_validate({"parallelism": {"activation_checkpointing": True}}), cpu) is True
    assert M.resolve_implementations(KernelsSection(attention="eager", experts="eager"), "cuda") == ("eager", "eager")


def test_tiny_preset_has_the_real_vocabulary():
    cfg = M.build_config(TINY, "eager", "eager")
    assert cfg.vocab_size == 201088
    m = M.create_model(cfg, torch.bfloat16, device="meta")
    assert m.lm_head.weight.shape == (201088, TINY.hidden_size)
    assert sum(p.numel() for p in m.parameters()) == TINY.total_params


def test_packed_loss_equals_samples_run_separately():
    module, cfg = _model()
    g = torch.Generator().manual_seed(1)
    segs = [_segment(n, g) for n in (9, 6, 11)]  # longer than the sliding window
    packed = LM.Batch.from_samples([_pack(segs, 32)], torch.device("cpu"))
    loss, count, _ = LM.run_batch(module, packed, cfg, torch.float32)
    sep_loss, sep_count = 0.0, 0
    for s in segs:
        b = LM.Batch.from_samples([_pack([s], len(s[0]) + 1)], torch.device("cpu"))
        l, c, _ = LM.run_batch(module, b, cfg, torch.float32)
        sep_loss += float(l)
        sep_count += int(c)
    assert int(count) == sep_count == sum(sum(1 for t in s[1][1:] if t != -100) for s in segs)
    assert float(loss) == pytest.approx(sep_loss, rel=1e-5)
    # Without the segment masks the packed rows would attend across samples and the loss would differ.
    plain = module.lm(input_ids=packed.input_ids, position_ids=packed.position_ids).logits
    cross = torch.nn.functional.cross_entropy(plain[0], packed.targets[0], ignore_index=-100, reduction="sum")
    assert float(cross) != pytest.approx(sep_loss, rel=1e-3)


def _assert_same_loss_and_grads(ref, cfg, other, other_cfg, seed, loss_tol, rtol, atol):
    """One packed batch (two segments) through both modules: equal losses and parameter gradients."""
    g = torch.Generator().manual_seed(seed)
    b = LM.Batch.from_samples([_pack([_segment(12, g), _segment(10, g)], 24)], torch.device("cpu"))
    l1, _, _ = LM.run_batch(ref, b, cfg, torch.float32)
    l2, _, _ = LM.run_batch(other, b, other_cfg, torch.float32)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(l1, l2, rtol=loss_tol, atol=loss_tol)
    for (n, p1), (_, p2) in zip(ref.named_parameters(), other.named_parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=rtol, atol=atol, msg=n)


def test_grouped_mm_experts_match_eager():
    ref, cfg = _model("eager", "eager")
    fast, cfg2 = _model("eager", "grouped_mm")
    fast.load_state_dict(ref.state_dict())
    _assert_same_loss_and_grads(ref, cfg, fast, cfg2, seed=2, loss_tol=1e-5, rtol=1e-4, atol=1e-6)


def test_lora_leaves_base_weights_untouched():
    module, cfg = _model()
    base_before = {k: v.clone() for k, v in module.lm.state_dict().items()}
    method = MethodSection(kind="lora", lora={"r": 4, "alpha": 8, "experts": True, "expert_layers": [1], "router": True})
    module.lm = M.apply_method(module.lm, method)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("layers.1.mlp.experts" in n for n in trainable) and not any("layers.0.mlp.experts" in n for n in trainable)
    assert any("router" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(3)
    b = LM.Batch.from_samples([_pack([_segment(14, g)], 16)], torch.device("cpu"))
    l0 = None
    for _ in range(3):
        loss, count, _ = LM.run_batch(module, b, cfg, torch.float32)
        (loss / count).backward()
        opt.step()
        opt.zero_grad()
        l0 = l0 if l0 is not None else float(loss)
    assert float(LM.run_batch(module, b, cfg, torch.float32)[0]) < l0  # the adapter learned something
    base_after = M.hf_model(module.lm).state_dict()
    for k, v in base_before.items():
        key = next(kk for kk in base_after if kk.replace("base_layer.", "") == k or kk.endswith(k))
        torch.testing.assert_close(base_after[key], v, rtol=0, atol=0, msg=k)


def test_lora_rank_and_layers_validated():
    with pytest.raises(Exception):
        MethodSection(kind="lora", lora={"r": 0})
    with pytest.raises(ValueError, match="expert_layers"):
        M.lora_config(MethodSection(lora={"experts": True, "expert_layers": [5]}), num_layers=2)


def test_sharded_init_on_meta_then_empty():
    cfg = M.build_config(SHAPE, "eager", "eager")
    m = M.create_model(cfg, torch.float32, device="meta")
    m.to_empty(device="cpu")
    M.init_sharded_weights_(m, std=0.02, seed=0)
    ref = M.create_model(cfg, torch.float32, seed=0)
    for (n, b1), (_, b2) in zip(m.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b1, b2, msg=n)
    out = m(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(out).all()
    assert float(m.model.norm.weight.mean()) == 1.0


@pytest.mark.parametrize("experts", ["eager", "fused"])
@pytest.mark.parametrize("policy", ["full", "selective", "none"])
def test_recompute_policies_give_the_same_gradients(policy, experts):
    """Full, selective (GEMM outputs kept) and no recomputation change memory and time, never the result."""
    attn, impl = M.resolve_implementations(KernelsSection(experts=experts, attention="eager"), "cpu")
    ref, cfg = _model(attn, impl)
    other, _ = _model(attn, impl)
    other.load_state_dict(ref.state_dict())
    M.enable_recompute(M.hf_model(other.lm), policy)
    assert M.hf_model(other.lm).is_gradient_checkpointing == (policy != "none")
    ref.train()
    other.train()
    _assert_same_loss_and_grads(ref, cfg, other, cfg, seed=3, loss_tol=1e-6, rtol=1e-5, atol=1e-7)


def test_unknown_recompute_policy_is_refused():
    m, _ = _model()
    with pytest.raises(ValueError, match="full, selective or none"):
        M.enable_recompute(M.hf_model(m.lm), "some")


def test_compiled_layers_match_eager_and_share_one_graph_per_layer_kind():
    """Compiling each decoder layer's forward changes no number, and layers of one kind reuse one graph
    (so 24 or 36 layers do not compile 24 or 36 times). aot_eager: the graph capture without codegen."""
    from torch._dynamo.utils import counters

    def run(layers: int, compiled: bool):
        shape = replace(SHAPE, num_hidden_layers=layers)
        cfg = M.build_config(shape, "eager", "eager")
        module = LM.CausalLMWithChunkedLoss(M.create_model(cfg, torch.float32, seed=0), chunk_tokens=5)
        if compiled:
            assert M.compile_layers(module.lm, backend="aot_eager") == layers
        g = torch.Generator().manual_seed(4)
        b = LM.Batch.from_samples([_pack([_segment(12, g), _segment(10, g)], 24)], torch.device("cpu"))
        loss, _, _ = LM.run_batch(module, b, cfg, torch.float32)
        loss.backward()
        return loss, {n: p.grad for n, p in module.named_parameters()}

    torch._dynamo.reset()
    counters.clear()
    l_ref, g_ref = run(2, compiled=False)
    l_c, g_c = run(2, compiled=True)
    graphs_2 = counters["stats"]["unique_graphs"]
    torch.testing.assert_close(l_ref, l_c, rtol=1e-6, atol=1e-6)
    for n in g_ref:
        torch.testing.assert_close(g_ref[n], g_c[n], rtol=1e-5, atol=1e-7, msg=n)
    torch._dynamo.reset()
    counters.clear()
    run(4, compiled=True)
    assert counters["stats"]["unique_graphs"] == graphs_2  # twice the layers, no new graphs
    torch._dynamo.reset()
