"""Long context: activation offloading (trainer/offload.py) changes where saved tensors wait, never the
gradients, and never copies a parameter; tiled experts (trainer/kernels/tiled_experts.py) match the
untiled experts in output and every gradient, for dense and MXFP4 experts, full fine-tuning and LoRA."""

from __future__ import annotations

from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from torch import nn  # noqa: E402

from gptoss_cloud.contract.shapes import TINY  # noqa: E402
from gptoss_cloud.contract.sections import KernelsSection, MethodSection  # noqa: E402
from gptoss_cloud.trainer import causal_lm as LM  # noqa: E402
from gptoss_cloud.trainer import model as M  # noqa: E402
from gptoss_cloud.trainer.kernels import tiled_experts as T  # noqa: E402
from gptoss_cloud.trainer.offload import offload_saved_tensors  # noqa: E402

SHAPE = replace(TINY, vocab_size=512, sliding_window=4)
SEQ = 24


def _module(experts="fused", base="bf16", tile=None, recompute="full", offload=False, method=None, seed=0):
    attn, impl = M.resolve_implementations(KernelsSection(experts=experts, attention="eager"), "cpu")
    cfg = M.build_config(SHAPE, attn, impl)
    hf = M.create_model(cfg, torch.float32, seed=seed, base_format=base)
    M.configure_experts_(hf, KernelsSection(moe_tile_tokens=tile))
    M.enable_recompute(hf, recompute)
    lm = M.apply_method(hf, method) if method is not None else hf
    module = LM.CausalLMWithChunkedLoss(lm, chunk_tokens=5, activation_offload=offload)
    module.offload_min_bytes = 0  # the tiny model's tensors are all below the 1 MiB default
    module.train()
    return module, cfg


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, SHAPE.vocab_size, (1, SEQ), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt part
    return LM.Batch.from_samples([LM_row(ids[0].tolist(), labels[0].tolist())], torch.device("cpu"))


def LM_row(ids, labels):
    from gptoss_cloud.trainer.data.pack import PackedSample

    return PackedSample(ids, labels, list(range(13)) + list(range(SEQ - 13)), [13, SEQ - 13])


def _loss_and_grads(module, cfg, batch):
    loss, _, _ = LM.run_batch(module, batch, cfg, torch.float32)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------- offloading
@pytest.mark.parametrize("method", [None, MethodSection(kind="lora", lora={"r": 4, "alpha": 8})], ids=["full", "lora"])
@pytest.mark.parametrize("experts", ["eager", "fused"])
def test_offloaded_activations_give_bit_identical_gradients(experts, method):
    """A copy to the host and back is exact, and backward runs the same ops in the same order."""
    ref, cfg = _module(experts, method=method)
    off, _ = _module(experts, method=method, offload=True)
    batch = _batch()
    l1, g1 = _loss_and_grads(ref, cfg, batch)
    l2, g2 = _loss_and_grads(off, cfg, batch)
    assert off.offload_stats.offloaded > 0 and ref.offload_stats is None
    torch.testing.assert_close(l2, l1, rtol=0, atol=0)
    assert g1.keys() == g2.keys() and g1
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=0, atol=0, msg=n)


def test_offload_catches_the_layer_inputs_and_the_head_and_nothing_inside_the_layers():
    """Outside the checkpointed layers autograd saves: the token ids (embedding), each layer's input, the
    final norm's fp32 input (twice: one copy) and rsqrt (twice: one copy), its output and weight (a
    parameter: kept), the loss's trained-position index and its hidden-state and weight gradients.
    Inside the layers the checkpoint's own hooks win, so nothing of theirs reaches ours."""
    module, cfg = _module("fused", offload=True)
    batch = _batch()
    _loss_and_grads(module, cfg, batch)
    st = module.offload_stats
    h, L, trained = SHAPE.hidden_size, SHAPE.num_hidden_layers, batch.trained_tokens
    expected = sorted([((1, SEQ), torch.int64)] + [((1, SEQ, h), torch.float32)] * (L + 2)
                      + [((1, SEQ, 1), torch.float32), ((trained,), torch.int64), ((trained, h), torch.float32),
                         ((SHAPE.vocab_size, h), torch.float32)], key=str)
    assert sorted(st.offloaded_shapes, key=str) == expected
    assert (st.kept, st.kept_parameters, st.reused) == (1, 1, 2)
    # Without recomputation the same context takes every layer's saved tensors too.
    plain, _ = _module("fused", recompute="none", offload=True)
    _loss_and_grads(plain, cfg, _batch())
    assert plain.offload_stats.offloaded > 4 * st.offloaded


def test_parameters_and_their_views_stay_where_they_are():
    lin = nn.Linear(64, 64)
    x = torch.randn(8, 64, requires_grad=True)
    hooks = offload_saved_tensors(min_bytes=0)
    with hooks:
        y = (lin(x) @ lin.weight.t()).sum() + (x * lin.weight[0]).sum()  # addmm saves weight.t(); mul a view
    st = hooks.stats
    assert st.kept_parameters == 3 and st.offloaded_shapes == [((8, 64), torch.float32)] * 2
    y.backward()
    assert x.grad is not None and lin.weight.grad is not None


def test_small_tensors_stay_on_the_device_by_default_and_a_tensor_saved_twice_is_copied_once():
    x = torch.randn(16, 16, requires_grad=True)  # 1 KiB, under MIN_OFFLOAD_BYTES
    small, every = offload_saved_tensors(), offload_saved_tensors(min_bytes=0)
    for hooks in (small, every):
        with hooks:
            y = (x * x).sum()  # mul saves x as both operands
        y.backward()
    assert (small.stats.offloaded, small.stats.kept) == (0, 2)
    assert (every.stats.offloaded, every.stats.reused, every.stats.kept) == (1, 1, 0)
    torch.testing.assert_close(x.grad, 2 * (2 * x), rtol=0, atol=0)  # two backwards: 2x each


# ------------------------------------------------------------------------------------------ tiled MoE
def _experts_inputs(e, h, k, seed=1):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(SEQ, e, generator=g)
    logits[:, 1] = -1e9  # an expert no token reaches
    logits[:7, 2] = 1e9  # one reached by the first tokens only
    top, idx = torch.topk(logits, k, dim=-1)
    return torch.randn(SEQ, h, generator=g) * 2, idx, torch.softmax(top, -1)


def _experts_pair(kind):
    """(config, experts module) in fp32 with every parameter trainable (dense) or the frozen MXFP4 form."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from gptoss_cloud.trainer.kernels.experts import FUSED_IMPL, register
    from gptoss_cloud.trainer.kernels.experts_mxfp4 import Mxfp4Experts

    register()
    cfg = M.build_config(replace(SHAPE, num_local_experts=5), "eager", FUSED_IMPL)
    torch.manual_seed(0)
    dense = GptOssExperts(cfg)
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0, 0.3)
    return cfg, (dense if kind == "dense" else Mxfp4Experts.from_dense(dense))


def _run_experts(experts, h, idx, w, tile):
    h, w = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = T.tiled_experts(experts, h, idx, w, tile) if tile else experts(h, idx, w)
    g = torch.Generator().manual_seed(7)
    out.backward(torch.randn(out.shape, generator=g))
    grads = {"hidden": h.grad, "routing_weights": w.grad}
    for n, p in experts.named_parameters():
        if p.requires_grad:
            grads[n], p.grad = p.grad, None
    return out.detach(), grads


def _close(got, want, what):
    # fp32 throughout. A tile changes only the order of fp32 sums: the GEMM rows per expert (K = 64 or 2x32
    # terms per output) and, for parameter gradients, the sum over the routed tokens (<= SEQ * k = 48 terms)
    # split into per-tile partial sums. Reordering a sum of n terms moves it by at most ~n * 2^-24 of the
    # sum of the terms' magnitudes (Higham, gamma_n): 64 * 6e-8 = 4e-6 of the largest value here, so
    # 1e-5 of each tensor's largest magnitude bounds it with room.
    scale = float(want.abs().max()) or 1.0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale, msg=what)


@pytest.mark.parametrize("kind", ["dense", "mxfp4"])
@pytest.mark.parametrize("tile", [5, 7, 1, SEQ, 100])  # uneven splits of experts across tiles; one tile; larger
def test_tiled_experts_match_untiled_output_and_every_gradient(kind, tile):
    _, experts = _experts_pair(kind)
    h, idx, w = _experts_inputs(experts.num_experts, SHAPE.hidden_size, SHAPE.num_experts_per_tok)
    want_out, want = _run_experts(experts, h, idx, w, None)
    got_out, got = _run_experts(experts, h, idx, w, tile)
    _close(got_out, want_out, "output")
    assert got.keys() == want.keys()
    assert len(want) == (6 if kind == "dense" else 2)  # hidden, weights (+ the 4 dense parameters)
    for n in want:
        _close(got[n], want[n], n)


def test_a_tile_at_least_the_sequence_runs_the_experts_as_they_are():
    _, experts = _experts_pair("dense")
    h, idx, w = _experts_inputs(experts.num_experts, SHAPE.hidden_size, SHAPE.num_experts_per_tok)
    want, _ = _run_experts(experts, h, idx, w, None)
    got, _ = _run_experts(experts, h, idx, w, SEQ)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["dense-full", "mxfp4-lora", "dense-lora-experts"])
@pytest.mark.parametrize("recompute", ["full", "none"])
def test_tiled_model_matches_untiled_with_and_without_recomputation(case, recompute):
    """Whole model: loss and every trainable gradient, with the tiles inside the checkpointed layers or not."""
    base, method = {
        "dense-full": ("bf16", None),
        "mxfp4-lora": ("mxfp4", MethodSection(kind="lora", lora={"r": 4, "alpha": 8})),
        "dense-lora-experts": ("bf16", MethodSection(kind="lora", lora={"r": 4, "alpha": 8, "experts": True, "router": True})),
    }[case]
    ref, cfg = _module(base=base, method=method, recompute=recompute)
    tiled, _ = _module(base=base, method=method, recompute=recompute, tile=5)
    batch = _batch(1)
    l1, g1 = _loss_and_grads(ref, cfg, batch)
    l2, g2 = _loss_and_grads(tiled, cfg, batch)
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-5 * float(l1.abs()))  # the same fp32 reorder bound
    assert g1.keys() == g2.keys()
    if method is not None and method.lora.experts:
        assert any("experts" in n for n in g1)  # peft's expert adapters train through the tiles
    for n in g1:
        _close(g2[n], g1[n], n)


def test_recomputed_layers_run_each_tile_twice_not_three_times():
    """Forward once, backward once per tile: the checkpoint's recomputation skips the experts (their
    output is never read there), so tiling costs one extra MoE forward, not two."""
    module, cfg = _module(tile=5, recompute="full")
    calls = []
    for layer in M.hf_model(module.lm).model.layers:
        layer.mlp.experts.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    _loss_and_grads(module, cfg, _batch())
    tiles = [5, 5, 5, 5, 4]
    assert calls == (tiles * SHAPE.num_hidden_layers) + (tiles * SHAPE.num_hidden_layers)


def test_tiling_refuses_the_reference_experts():
    with pytest.raises(ValueError, match="kernels.moe_tile_tokens tiles the fused and MXFP4 experts"):
        _module("eager", tile=8)
    with pytest.raises(ValueError, match="moe_tile_tokens must be >= 1"):
        T.tile_mlp_(nn.Module(), 0)


# --------------------------------------------------------------------------------------------- bench
def test_the_bench_variant_keys_build_plan_and_train_them():
    from gptoss_cloud.trainer.bench import run as B
    from gptoss_cloud.trainer.bench.variants import plan_spec

    opts = B.BenchOptions(model="tiny", seq=64, steps=1, warmup=0, device="cpu", timeout_s=300, experts="fused",
                          attention="eager", variant_specs=["recompute=full", "recompute=full,act_offload=yes,moe_tile=16"])
    vs = B.variants(opts, on_gpu=False)
    assert vs[1].name == "ours (fused + eager, recompute full, activations offloaded, MoE tiles of 16)"
    spec = plan_spec(vs[1].apply(opts.setup()), vs[1], 1)
    assert spec.parallelism.activation_offload and spec.kernels.moe_tile_tokens == 16
    assert plan_spec(vs[0].apply(opts.setup()), vs[0], 1).kernels.moe_tile_tokens is None
    plain, long = B.run_benchmark(opts, runner=B.run_in_process)["results"]
    assert plain["status"] == long["status"] == "ok", long.get("error")
    # The first step's loss is the forward's: the tiles reorder fp32 sums only (see _close).
    assert long["losses"][0] == pytest.approx(plain["losses"][0], rel=1e-5)
    for text, msg in (("recompute=selective,moe_tile=16", "selective keeps the GEMM outputs"),
                      ("recompute=none,act_offload=yes", "needs recompute full or auto"),
                      ("moe_tile=lots", "moe_tile must be a number of tokens")):
        with pytest.raises(ValueError, match=msg):
            B.parse_variant(text, opts, on_gpu=False)
