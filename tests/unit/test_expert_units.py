"""parallelism.expert_units: a layer's experts as several modules (FSDP2 units) with the math of the one
module they replace, checkpoint names joined back for the merge, and the planner's unit-sized buffers.

Tolerance (fp32 on CPU): both paths multiply the same rows by the same expert matrices; the split path
only slices the sorted rows by unit and concatenates the outputs. Any difference is in how a matrix
product library blocks a row range it is handed, i.e. fp32 summation order over at most K = max(H, I)
terms: |diff| <= K * 2^-24 * sum|x||w| per element, well under the rtol/atol of 1e-5 used below for
values of order 1-100."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_experts import _config, _experts, _routing, _run  # noqa: E402

from gptoss_cloud.trainer.kernels import experts as X  # noqa: E402
from gptoss_cloud.trainer.kernels import expert_units as U  # noqa: E402


def _split_grads(split):
    """The units' parameter gradients stacked back into the transformers tensors' layout."""
    return {p: torch.cat([getattr(u, p).grad for u in split.units]) for p in U.PARAMS}


@pytest.mark.parametrize("units", [2, 3, 6])
def test_split_experts_match_the_fused_module(units):
    cfg = _config(e=6)
    dense = _experts(cfg, seed=0)
    x = torch.randn(40, cfg.hidden_size) * 3
    idx, w = _routing(40, cfg.num_local_experts, cfg.num_experts_per_tok, seed=1, skip_expert=3)
    ref = _run(X.fused_experts_forward, dense, x, idx, w)
    split = U.SplitExperts(dense, units)
    assert len(split.units) == units and all(isinstance(u, U.ExpertUnit) for u in split.units)
    xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = split(xs, idx, ws)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    torch.testing.assert_close(out, ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xs.grad, ref[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ws.grad, ref[2], rtol=1e-5, atol=1e-5)
    for name, g in _split_grads(split).items():
        torch.testing.assert_close(g, ref[3][name], rtol=1e-5, atol=1e-5, msg=name)


def test_a_unit_without_rows_still_gets_zero_gradients():
    """FSDP2 reduce-scatters each unit's gradients on every rank: a unit no token reached must have them too."""
    cfg = _config(e=4)
    split = U.SplitExperts(_experts(cfg, seed=0), 2)
    x = torch.randn(10, cfg.hidden_size)
    idx = torch.tensor([[0, 1]] * 10)  # experts 2 and 3 (the second unit) get nothing
    split(x, idx, torch.full((10, 2), 0.5)).sum().backward()
    second = split.units[1]
    for p in U.PARAMS:
        g = getattr(second, p).grad
        assert g is not None and float(g.abs().sum()) == 0.0, p
    assert float(split.units[0].gate_up_proj.grad.abs().sum()) > 0


def test_units_must_divide_the_experts():
    with pytest.raises(ValueError, match="expert_units: 4 must divide the layer's 6 experts"):
        U.SplitExperts(_experts(_config(e=6), seed=0), 4)


def test_split_in_a_model_keeps_its_logits_and_names_units_for_fsdp2():
    from transformers import GptOssForCausalLM

    X.register()
    cfg = _config(e=4)
    cfg._attn_implementation, cfg._experts_implementation = "eager", X.FUSED_IMPL
    torch.manual_seed(0)
    model = GptOssForCausalLM(cfg).float()
    ids = torch.randint(0, 32, (2, 12))
    ref = model(ids).logits
    assert U.split_experts_(model, 2) == cfg.num_hidden_layers
    assert U.split_experts_(model, 2) == 0  # already split: nothing left to do
    names = [n for n, _ in model.named_parameters() if ".experts." in n]
    assert names and all(U.unit_key(n) for n in names), names
    assert type(model.model.layers[0].mlp.experts.units[0]).__name__ == U.UNIT_CLASS
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_checkpoint_entries_join_back_to_transformers_names():
    f32 = torch.float32
    entries = {"model.layers.0.mlp.experts.units.1.down_proj": ((2, 8, 4), f32),
               "model.layers.0.mlp.experts.units.0.down_proj": ((2, 8, 4), f32),
               "model.layers.0.self_attn.q_proj.weight": ((4, 4), f32)}
    joined, parts = U.join_unit_entries(entries)
    assert joined == {"model.layers.0.mlp.experts.down_proj": ((4, 8, 4), f32),
                      "model.layers.0.self_attn.q_proj.weight": ((4, 4), f32)}
    assert parts["model.layers.0.mlp.experts.down_proj"] == ["model.layers.0.mlp.experts.units.0.down_proj",
                                                            "model.layers.0.mlp.experts.units.1.down_proj"]
    with pytest.raises(ValueError, match=r"units \[0, 2\] are not 0..1"):
        U.join_unit_entries({"a.experts.units.0.down_proj": ((2, 3), f32), "a.experts.units.2.down_proj": ((2, 3), f32)})
    with pytest.raises(ValueError, match="disagree in shape"):
        U.join_unit_entries({"a.experts.units.0.down_proj": ((2, 3), f32), "a.experts.units.1.down_proj": ((2, 4), f32)})


def test_expert_units_refuse_what_they_cannot_split():
    from gptoss_cloud.contract.spec import RunSpec

    base = {"model": {"name": "20b"}, "method": {"kind": "full"}}
    assert RunSpec.model_validate({**base, "parallelism": {"expert_units": 4}}).parallelism.expert_units == 4
    for extra, what in (({"model": {"name": "20b", "base_format": "mxfp4"}, "method": {"kind": "lora"}}, "base_format: mxfp4"),
                        ({"method": {"kind": "full", "qat": "mxfp4"}}, "method.qat: mxfp4"),
                        ({"kernels": {"moe_tile_tokens": 4096}}, "kernels.moe_tile_tokens"),
                        ({"kernels": {"experts": "eager"}}, "kernels.experts: eager")):
        with pytest.raises(ValueError, match="expert_units: 4") as e:
            RunSpec.model_validate({**base, **extra, "parallelism": {"expert_units": 4}})
        assert what in str(e.value)


# ------------------------------------------------------------------------------------------- planner
def _spec(**parallelism):
    from gptoss_cloud.contract.spec import RunSpec

    return RunSpec.model_validate({"model": {"name": "120b"}, "method": {"kind": "full"},
                                   "optim": {"name": "adamw_8bit", "master_weights": "bf16"},
                                   "parallelism": {"nodes": 2, "gpus_per_node": 8, **parallelism}})


def test_the_planner_counts_unit_sized_buffers():
    from gptoss_cloud.contract.plan.memory import expert_units_option, memory_plan
    from gptoss_cloud.contract.shapes import GPT_OSS_120B as S

    whole, split = memory_plan(_spec()), memory_plan(_spec(expert_units=8))
    experts = S.num_local_experts * S.expert_params
    unit = max(experts / 8, S.embedding_params)
    assert whole.gpu["layer gradient buffers (bf16 + fp32 reduce)"] == pytest.approx(S.layer_params * 6 / 2**30, rel=1e-3)
    assert split.gpu["unit gradient buffers (bf16 + fp32 reduce)"] == pytest.approx(unit * 6 / 2**30, rel=1e-3)
    gathered = split.gpu["all-gather buffers (a layer's own unit + 2 of 8 expert units, bf16)"]
    # the embedding's unit and its neighbour's are the bigger pair here
    pair = max(S.layer_params - experts + 2 * experts / 8, 2 * S.embedding_params)
    assert gathered == pytest.approx(pair * 2 / 2**30, rel=1e-3)
    assert not whole.fits and split.fits and split.gpu_total_gib < 76
    assert expert_units_option(_spec(), S) == 8  # 3.19 B expert parameters a layer / 8 <= the 0.58 B embedding
    assert any("parallelism.expert_units: 8" in s for s in memory_plan(_spec(activation_checkpointing=True)).suggestions)


def test_120b_full_on_two_h100_nodes_fits_without_offload():
    """Issue "Performance IV": plan --model 120b --nodes 2 --gpus-per-node 8 --method full shows a configuration
    that fits 80 GB cards without CPU offload, and submit's choice is it."""
    from gptoss_cloud.contract.plan.configs import choose, configurations, fastest
    from gptoss_cloud.contract.spec import RunSpec

    spec = RunSpec.model_validate({"model": {"name": "120b"}, "method": {"kind": "full"},
                                   "parallelism": {"nodes": 2, "gpus_per_node": 8}})
    rows = configurations(spec)
    best = fastest(rows)
    assert best is not None and not best.cpu_offload and best.expert_units == 8 and best.gpu_gib <= 76
    assert (best.name, best.master_weights) == ("adamw_8bit", "bf16")
    assert not any(r.fits for r in rows if r.expert_units == 1 and not r.cpu_offload)
    chosen, note = choose(spec)
    assert chosen.parallelism.expert_units == 8 and not chosen.parallelism.cpu_offload and "expert_units 8" in note
