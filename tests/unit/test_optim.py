"""Optimizer choices: the spec fields, the bytes-per-parameter table, the optimizer built, and the
planner's table of configurations."""

from __future__ import annotations

import json

import pytest
from gptoss_cloud.contract.plan.optim_bytes import checkpoint_bytes_per_param, trainable_bytes
from gptoss_cloud.contract.plan.memory import memory_plan
from gptoss_cloud.contract.plan.disk import checkpoint_bytes
from gptoss_cloud.contract.plan.configs import configurations, fastest
from gptoss_cloud.contract.shapes import GPT_OSS_120B
from gptoss_cloud.contract.spec import RunSpec
from gptoss_cloud.contract.sections import OptimSection


def spec(nodes=2, gpus=8, gpu="H100", **optim):
    return RunSpec.model_validate({"model": {"name": "120b"}, "method": {"kind": "full"}, "optim": optim,
                                   "parallelism": {"nodes": nodes, "gpus_per_node": gpus}, "cluster": {"gpu_type": gpu}})


@pytest.mark.parametrize("name,masters,resident,checkpoint", [
    ("adamw", "fp32", 16.0, 12.0),
    ("adamw_8bit", "fp32", 4 + 4 + 2 * (1 + 4 / 256), 4 + 2 * (1 + 4 / 256)),
    ("adamw_8bit", "bf16", 2 + 2 + 2 * (1 + 4 / 256), 2 + 2 * (1 + 4 / 256)),
])
def test_bytes_per_parameter(name, masters, resident, checkpoint):
    o = OptimSection(name=name, master_weights=masters)
    assert trainable_bytes(o) == resident and checkpoint_bytes_per_param(o) == checkpoint


def test_spec_defaults_and_clear_refusals():
    assert (OptimSection().name, OptimSection().master_weights) == ("adamw", "fp32")
    with pytest.raises(ValueError, match="adamw_4bit is not offered: .*2x the loss of fp32 AdamW"):
        OptimSection(name="adamw_4bit")
    with pytest.raises(ValueError, match="master_weights: bf16 needs name: adamw_8bit"):
        OptimSection(master_weights="bf16")
    with pytest.raises(ValueError, match="name"):
        OptimSection(name="sgd")


def test_the_planner_counts_the_optimizer_in_memory_and_checkpoints():
    shape = GPT_OSS_120B
    fp32, low = spec(), spec(name="adamw_8bit", master_weights="bf16")
    state = {k: v for k, v in memory_plan(low).gpu.items() if k.startswith("params+grads+adam")}
    assert list(state) == ["params+grads+adam (adamw_8bit, bf16 masters, sharded)"]
    assert state[next(iter(state))] == pytest.approx(shape.total_params * 6.03125 / 16 / 1024**3, abs=1e-3)
    assert memory_plan(fp32).gpu_total_gib - memory_plan(low).gpu_total_gib == pytest.approx(
        shape.total_params * (16 - 6.03125) / 16 / 1024**3 * 1.16, rel=1e-3)
    assert checkpoint_bytes(shape, low) / checkpoint_bytes(shape, fp32) == pytest.approx(4.03125 / 12, rel=1e-3)


def test_configurations_of_120b_full_on_two_h100_nodes():
    rows = configurations(spec())
    keys = [(r.name, r.master_weights, r.cpu_offload, r.recompute, r.expert_units) for r in rows]
    # 3 optimizers x recomputation x the experts whole or in 8 units, and 2 offload rows (experts whole)
    assert len(set(keys)) == len(keys) == 14
    assert sum(r.fastest for r in rows) == 1 and fastest(rows).fits
    no_offload = {(r.name, r.master_weights): r.gpu_gib for r in rows if not r.cpu_offload and r.recompute and r.expert_units == 1}
    assert no_offload[("adamw", "fp32")] > no_offload[("adamw_8bit", "fp32")] > no_offload[("adamw_8bit", "bf16")]
    # The host step and the copies are what make offload slow: every offload row is slower than every
    # row without it.
    assert min(r.step_s for r in rows if r.cpu_offload) > max(r.step_s for r in rows if not r.cpu_offload)


def test_eight_bit_states_fit_where_fp32_states_need_offload():
    """120b full on 3 x 8 H100: fp32 AdamW fits only with offload; 8-bit moments with bf16 masters fit
    without it and are the fastest row."""
    rows = configurations(spec(nodes=3))
    fits = {(r.name, r.master_weights, r.cpu_offload) for r in rows if r.fits}
    assert ("adamw", "fp32", False) not in fits and ("adamw", "fp32", True) in fits
    best = fastest(rows)
    assert (best.name, best.master_weights, best.cpu_offload) == ("adamw_8bit", "bf16", False)


def test_single_gpu_has_no_offload_rows():
    rows = configurations(spec(nodes=1, gpus=1, gpu="H200"))
    assert rows and not any(r.cpu_offload for r in rows)


def test_plan_command_prints_the_configurations():
    from gptoss_cloud.main import app
    from typer.testing import CliRunner

    args = ["plan", "--model", "120b", "--nodes", "2", "--gpus-per-node", "8", "--method", "full"]
    r = CliRunner(env={"COLUMNS": "200"}).invoke(app, args)
    assert "Configurations on 2 x 8 H100" in r.stdout and "fastest that fits" in r.stdout, r.output
    d = json.loads(CliRunner().invoke(app, args + ["-o", "json"]).stdout)
    assert len(d["configurations"]) == 14 and sum(c["fastest"] for c in d["configurations"]) == 1


# ------------------------------------------------------------------------------------------ optimizer
torch = pytest.importorskip("torch")


def test_make_optimizer_builds_the_named_one():
    from gptoss_cloud.trainer.optim import make_optimizer

    p = [torch.nn.Parameter(torch.randn(64, 128))]
    assert type(make_optimizer(p, OptimSection(), torch.device("cpu"))) is torch.optim.AdamW
    pytest.importorskip("torchao")
    opt = make_optimizer(p, OptimSection(name="adamw_8bit"), torch.device("cpu"))
    p[0].grad = torch.randn_like(p[0])
    opt.step()
    m = opt.state[p[0]]["exp_avg"]
    assert type(m).__name__ == "OptimState8bit" and m.codes.dtype == torch.uint8 and m.codes.numel() == 64 * 128


def test_master_dtype_must_match_the_weights():
    pytest.importorskip("torchao")
    from gptoss_cloud.trainer.optim import make_optimizer

    p = [torch.nn.Parameter(torch.randn(64, 128))]
    with pytest.raises(ValueError, match="master_weights is bf16 but trainable weights are torch.float32"):
        make_optimizer(p, OptimSection(name="adamw_8bit", master_weights="bf16"), torch.device("cpu"))


def test_bf16_masters_keep_updates_smaller_than_a_bf16_step():
    """Weights at 1.0 (bf16 step 2**-7) and updates of ~1e-4: round to nearest would never move them;
    stochastic rounding moves them by the right amount on average."""
    pytest.importorskip("torchao")
    from gptoss_cloud.trainer.optim import make_optimizer

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.ones(64, 256, dtype=torch.bfloat16))
    opt = make_optimizer([p], OptimSection(name="adamw_8bit", master_weights="bf16", lr=1e-4), torch.device("cpu"))
    for _ in range(20):
        p.grad = torch.ones_like(p)  # Adam's normalised step is ~lr every step
        opt.step()
    moved = 1.0 - p.float().mean().item()
    assert moved == pytest.approx(20 * 1e-4, rel=0.2)


# ---- submit's choice -------------------------------------------------------------------------------
def test_submit_runs_the_fastest_configuration_that_fits_and_says_so():
    from gptoss_cloud.contract.plan.configs import choose, configurations, fastest

    s = RunSpec.model_validate({"model": {"name": "120b"}, "method": {"kind": "full"},
                                "parallelism": {"nodes": 2, "gpus_per_node": 8}, "cluster": {"gpu_type": "H100"}})
    assert not memory_plan(s).fits   # fp32 AdamW without offload: over an 80 GB card
    chosen, note = choose(s)
    best = fastest(configurations(s))
    assert (chosen.optim.name, chosen.optim.master_weights, chosen.parallelism.cpu_offload) == \
           (best.name, best.master_weights, best.cpu_offload)
    assert chosen.parallelism.activation_checkpointing is best.recompute
    assert chosen.parallelism.expert_units == best.expert_units
    assert memory_plan(chosen).fits
    assert note.startswith(f"configuration: {best.optimizer}, cpu_offload {str(best.cpu_offload).lower()}")
    assert "the fastest that fits 2 x 8 H100" in note and "Set optim.name" in note


@pytest.mark.parametrize("named", [{"optim": {"name": "adamw"}}, {"parallelism": {"nodes": 2, "gpus_per_node": 8, "cpu_offload": False}},
                                   {"parallelism": {"nodes": 2, "gpus_per_node": 8, "activation_checkpointing": True}}])
def test_a_spec_that_names_its_configuration_keeps_it(named):
    from gptoss_cloud.contract.plan.configs import choose

    tree = {"model": {"name": "120b"}, "method": {"kind": "full"}, "parallelism": {"nodes": 2, "gpus_per_node": 8},
            "cluster": {"gpu_type": "H100"}}
    for k, v in named.items():
        tree[k] = {**tree.get(k, {}), **v}
    s = RunSpec.model_validate(tree)
    assert choose(s) == (s, None)


def test_defaults_that_are_already_fastest_are_left_as_written():
    from gptoss_cloud.contract.plan.configs import choose

    s = RunSpec.model_validate({"model": {"name": "20b"}, "method": {"kind": "lora"}, "cluster": {"gpu_type": "H200"}})
    chosen, note = choose(s)
    assert note is None and chosen is s   # activation_checkpointing stays `auto`: the trainer resolves it the same way


def test_submit_dry_run_prints_the_choice_and_renders_it(tmp_path):
    from typer.testing import CliRunner

    from gptoss_cloud.main import app

    spec = tmp_path / "s.yaml"
    spec.write_text("model: {name: 120b}\nmethod: {kind: full}\nparallelism: {nodes: 2, gpus_per_node: 8}\n"
                    "cluster: {backend: k8s, gpu_type: H100}\noutput: {store: s3://b/runs}\n")
    r = CliRunner().invoke(app, ["submit", str(spec), "--dry-run", "-o", "json"])
    assert r.exit_code == 0, r.output
    assert "configuration: " in r.output and "the fastest that fits" in r.output
    rendered = r.stdout[r.stdout.index("{"):]
    cm = next(o for o in json.loads(rendered)["items"] if o["kind"] == "ConfigMap")
    assert "cpu_offload: true" in cm["data"]["spec.yaml"] or "name: adamw_8bit" in cm["data"]["spec.yaml"]
