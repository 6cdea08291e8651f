"""`gptoss-cloud bench` end to end on CPU (tiny shape), and an out-of-memory variant recorded, not fatal."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from gptoss_cloud.main import app
from gptoss_cloud.trainer.bench import report as BR, run as B
from gptoss_cloud.trainer.bench.variants import Prepared, Variant, build
from gptoss_cloud.trainer.parallel import DistInfo
from gptoss_cloud.trainer.bench.worker import measure_variant

ROW_KEYS = {
    "variant", "status", "error", "step_times_s", "losses", "world_size", "build_s", "trainable_params",
    "total_params", "tokens_per_step", "peak_allocated_gib", "peak_reserved_gib", "median_step_s",
    "tokens_per_s", "tokens_per_s_per_gpu", "tflops_per_gpu", "mfu", "ratio_to_baseline",
    "planned_reserved_gib", "label",
}
TOP_KEYS = {"report_version", "date", "timestamp", "command", "environment", "options", "shape",
            "tokens_per_step_per_gpu", "flops", "baseline", "results"}
ENV_KEYS = {"python", "torch", "transformers", "peft", "accelerate", "card", "driver", "cuda", "card_memory_gib", "gpus_visible"}


def tiny(**kw) -> B.BenchOptions:
    base = dict(model="tiny", seq=64, steps=2, warmup=1, baseline=True, device="cpu", timeout_s=300)
    base.update(kw)
    return B.BenchOptions(**base)


def check_report(report: dict, n_variants: int) -> None:
    assert TOP_KEYS <= report.keys()
    assert ENV_KEYS <= report["environment"].keys()
    assert report["environment"]["card"] == "cpu"
    assert len(report["results"]) == n_variants
    for row in report["results"]:
        assert ROW_KEYS <= row.keys(), ROW_KEYS - row.keys()
        if row["status"] == "ok":  # the FLOPs of what this row ran: its own recomputation
            assert f"recompute={row['recompute']})" in row["flops"]["formula"]
            assert row["flops"]["per_token"] > row["flops"]["dense_per_token"] > 0
    json.dumps(report)  # serialisable as written


@pytest.mark.slow
def test_cli_bench_tiny_cpu_ours_and_baseline(tmp_path):
    out = tmp_path / "report.json"
    res = CliRunner().invoke(app, ["bench", "--model", "tiny", "--seq", "64", "--steps", "2", "--warmup", "1",
                                   "--baseline", "--device", "cpu", "--out", str(out)], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    check_report(report, 2)
    ours, ref = report["results"]
    assert ours["variant"]["stack"] == "ours" and ref["variant"]["stack"] == "transformers"
    assert report["baseline"] == ref["variant"]["name"]
    for row in (ours, ref):
        assert row["status"] == "ok", row.get("error")
        assert len(row["step_times_s"]) == 2 and len(row["losses"]) == 3  # 1 warm-up + 2 timed
        assert all(t > 0 for t in row["step_times_s"])
        assert row["tokens_per_s"] == pytest.approx(64 / row["median_step_s"])
        assert row["mfu"] is None  # no peak for a CPU
        assert row["world_size"] == 1
    # Both start from the same random weights' distribution and the full vocabulary: loss ~ ln(201088) ~ 12.2.
    assert 10 < ours["losses"][0] < 14 and 10 < ref["losses"][0] < 14
    # LoRA r=16 on q,k,v,o of two layers: the same trainable count in both stacks.
    assert ours["trainable_params"] == ref["trainable_params"] > 0
    assert ref["ratio_to_baseline"] == pytest.approx(1.0)
    assert ours["ratio_to_baseline"] == pytest.approx(ours["tokens_per_s"] / ref["tokens_per_s"])
    assert ours["planned_reserved_gib"] > 0 and ref["planned_reserved_gib"] is None
    assert report["command"] == ("gptoss-cloud bench --model tiny --method lora --seq 64 --steps 2 --warmup 1 "
                                 "--ours --baseline --device cpu")
    header = next(line for line in res.output.splitlines() if "variant" in line)  # the table, wide enough to read
    assert "tokens/s/GPU" in header and "MFU" in header
    assert any(line.count("ours (eager + eager)") and "ok" in line for line in res.output.splitlines()[2:])


def oom_on_second_step(setup, variant, rank) -> Prepared:
    """A step double that runs out of memory: the one place the benchmark is given a fake."""
    calls = {"n": 0}

    def step():
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 24.56 GiB.")
        return torch.tensor(1.0)

    return Prepared(step, trainable_params=10, total_params=100, tokens_per_step=setup.seq)


def test_oom_in_a_variant_is_recorded_and_the_benchmark_goes_on(tmp_path):
    opts = tiny()
    rank = DistInfo(0, 1, 0, 1, torch.device("cpu"))

    def runner(variant: Variant, o: B.BenchOptions) -> dict:
        prepare = oom_on_second_step if variant.stack == "transformers" else build
        return B.merge_ranks([measure_variant(o.setup(), variant, rank, o.warmup, o.steps, prepare=prepare)])

    report = B.run_benchmark(opts, runner=runner)
    check_report(report, 2)
    ours, ref = report["results"]
    assert ours["status"] == "ok" and ours["tokens_per_s"] > 0
    assert ref["status"] == "oom"
    assert "during step 2" in ref["error"] and "Tried to allocate 24.56 GiB" in ref["error"]
    assert ref["label"] == "OOM"  # on a GPU: "OOM at <peak reserved> GiB"
    assert ref["tokens_per_s"] is None and ours["ratio_to_baseline"] is None
    path = BR.write_report(report, tmp_path / "r.json")
    assert json.loads(path.read_text())["results"][1]["status"] == "oom"
    from rich.console import Console

    console = Console(record=True, width=250)
    console.print(BR.report_table(report))
    assert "OOM" in console.export_text()


def test_oom_label_carries_the_peak_reserved():
    opts = tiny()
    raw = B.failed_result(Variant("transformers (eager + eager)", "transformers", "eager", "eager"), "x")
    raw.update(status="oom", peak_reserved_gib=77.46, world_size=1)
    row = BR.derive(raw, opts, opts.setup().shape(), peak_tflops=989.0)
    assert row["label"] == "OOM at 77.5 GiB"


def test_merge_ranks_takes_rank0_times_max_peaks_worst_status():
    v = Variant("ours", "ours", "eager", "eager").to_dict()
    r0 = {"variant": v, "rank": 0, "status": "ok", "error": None, "step_times_s": [1.0], "peak_allocated_gib": 10.0, "peak_reserved_gib": 12.0}
    r1 = {"variant": v, "rank": 1, "status": "oom", "error": "CUDA out of memory during build", "step_times_s": [],
          "peak_allocated_gib": 70.0, "peak_reserved_gib": 79.0}
    m = B.merge_ranks([r1, r0])
    assert m["status"] == "oom" and m["error"].startswith("rank 1:")
    assert m["step_times_s"] == [1.0] and m["peak_reserved_gib"] == 79.0 and m["ranks_reported"] == 2


def test_variants_per_device():
    gpu = [v.name for v in B.variants(B.BenchOptions(baseline=True, baseline_eager=True), on_gpu=True)]
    # ours is the trainer's GPU default: fused experts, flex attention, compiled layers, recompute as the planner says
    assert gpu == ["ours (fused + flex, compiled layers)", "transformers (grouped_mm + flex)", "transformers (eager + eager)"]
    cpu = B.variants(B.BenchOptions(baseline=True, baseline_eager=True), on_gpu=False)
    assert [v.name for v in cpu] == ["ours (eager + eager)", "transformers (eager + eager)"]
    only_ref = B.variants(B.BenchOptions(ours=False, baseline=True, experts="eager"), on_gpu=True)
    assert [v.stack for v in only_ref] == ["transformers"]


def test_variant_options_make_one_row_each_with_their_overrides():
    opts = B.BenchOptions(variant_specs=["experts=fused,compile=no", "experts=fused,recompute=none,base=mxfp4,dequant=triton"],
                          baseline=True)
    vs = B.variants(opts, on_gpu=True)
    assert [v.name for v in vs] == ["ours (fused + flex)",
                                    "ours (fused + flex, mxfp4 base, triton dequant, recompute none, compiled layers)",
                                    "transformers (grouped_mm + flex)"]
    eff = vs[1].apply(opts.setup())
    assert (eff.recompute, eff.base_format, eff.dequant, eff.offload) == ("none", "mxfp4", "triton", False)
    assert vs[2].apply(opts.setup()) == opts.setup()  # the reference: no overrides
    assert B.Variant.from_dict(vs[1].to_dict()) == vs[1]  # crosses the process boundary intact
    assert "--variant experts=fused,recompute=none,base=mxfp4,dequant=triton" in B.command_line(opts)


def test_profile_categories_attribute_each_op_once():
    from types import SimpleNamespace as E

    from gptoss_cloud.trainer.bench import profile as P

    assert P.categorise("aten::_grouped_mm") == "expert GEMMs"
    assert P.categorise("_mxfp4_gmm_nt") == "expert GEMMs"  # decodes MXFP4 inside the GEMM
    assert P.categorise("_dequant_kernel") == "MXFP4 dequantise"
    assert P.categorise("nccl:_all_gather_base") == "communication"
    assert P.categorise("aten::_fused_adamw_") == "optimizer"
    assert P.categorise("triton_tem_fused_flex_attention_0") == "attention"
    assert P.categorise("aten::addmm") == "dense GEMMs"
    assert P.categorise("aten::index_copy_") == "routing + permutation"
    assert P.categorise("something_new") == "other"
    cpu, cuda = "DeviceType.CPU", "DeviceType.CUDA"
    avgs = [E(key="aten::_grouped_mm", device_type=cpu, self_device_time_total=6000.0, self_cpu_time_total=10.0,
              cpu_time_total=10.0, count=48),
            E(key="aten::mm", device_type=cpu, self_device_time_total=2000.0, self_cpu_time_total=5.0, cpu_time_total=5.0, count=9),
            E(key="Optimizer.step#AdamW.step", device_type=cpu, self_device_time_total=0.0, self_cpu_time_total=1.0,
              cpu_time_total=3000.0, count=1),
            E(key="sm90_grouped_kernel", device_type=cuda, self_device_time_total=6000.0, self_cpu_time_total=0.0,
              cpu_time_total=0.0, count=48)]
    s = P.summarise(avgs, wall_s=0.01, on_device=True)
    assert s["busy_ms"] == 8.0  # the kernel row is not counted again
    assert s["by_category"][0] == {"category": "expert GEMMs", "ms": 6.0, "share": 0.75}
    assert s["top_kernels"][0]["name"] == "sm90_grouped_kernel"
    assert s["host_ranges_ms"] == {"Optimizer.step#AdamW.step": 3.0}


def test_lora_on_experts_is_a_variant_of_ours(tmp_path):
    """lora_experts=all|0+12: method.lora.experts for the build and the planner; trains on CPU."""
    from gptoss_cloud.trainer.bench.variants import method_section, plan_spec

    opts = tiny(variant_specs=["lora_experts=no", "lora_experts=1"], baseline=False)
    vs = B.variants(opts, on_gpu=False)
    assert [v.name for v in vs] == ["ours (eager + eager)", "ours (eager + eager, LoRA on experts of layers 1)"]
    eff = vs[1].apply(opts.setup())
    lora = method_section(eff).lora
    assert (lora.experts, lora.expert_layers) == (True, [1])
    assert plan_spec(eff, vs[1], 1).method.lora.expert_layers == [1]
    assert method_section(B.parse_variant("lora_experts=all", opts, False).apply(opts.setup())).lora.expert_layers is None
    r = B.run_benchmark(opts, runner=B.run_in_process)
    plain, experts = r["results"]
    assert plain["status"] == experts["status"] == "ok"
    assert experts["trainable_params"] > plain["trainable_params"]  # layer 1's experts carry adapters too


def test_optimizer_variant_of_ours_trains_and_is_planned(tmp_path):
    """optim=adamw_8bit,masters=bf16: ours with torchao's 8-bit moments on bf16 weights, full fine-tuning
    on CPU beside fp32 AdamW; the planner sees the same choice."""
    pytest.importorskip("torchao")
    from gptoss_cloud.trainer.bench.variants import plan_spec

    opts = tiny(method="full", variant_specs=["optim=adamw", "optim=adamw_8bit,masters=bf16"], baseline=False)
    vs = B.variants(opts, on_gpu=False)
    assert vs[1].name == "ours (eager + eager, adamw_8bit, bf16 masters)"
    spec = plan_spec(vs[1].apply(opts.setup()), vs[1], 1)
    assert (spec.optim.name, spec.optim.master_weights) == ("adamw_8bit", "bf16")
    r = B.run_benchmark(opts, runner=B.run_in_process)
    assert [x["status"] for x in r["results"]] == ["ok", "ok"], r["results"]


def test_qat_is_a_variant_of_ours_for_full_and_lora_on_experts(tmp_path):
    """qat=mxfp4: method.qat for the build and the planner; beside the plain step on CPU, same shape."""
    from gptoss_cloud.trainer.bench.variants import method_section, plan_spec

    opts = tiny(method="full", variant_specs=["qat=none", "qat=mxfp4"], baseline=False)
    vs = B.variants(opts, on_gpu=False)
    assert [v.name for v in vs] == ["ours (eager + eager)", "ours (eager + eager, mxfp4 QAT)"]
    eff = vs[1].apply(opts.setup())
    assert method_section(eff).qat == plan_spec(eff, vs[1], 1).method.qat == "mxfp4"
    lora = B.parse_variant("lora_experts=all,qat=mxfp4", tiny(), False)
    assert method_section(lora.apply(tiny().setup())).qat == "mxfp4"
    r = B.run_benchmark(opts, runner=B.run_in_process)
    plain, qat = r["results"]
    assert plain["status"] == qat["status"] == "ok"
    assert plain["trainable_params"] == qat["trainable_params"]  # the same model; only the forward differs
    assert plain["losses"][0] != qat["losses"][0]  # the first forward already sees the rounded experts


def test_profiled_cpu_bench_reports_where_the_step_goes(tmp_path):
    r = B.run_benchmark(tiny(profile=True, variant_specs=["recompute=selective"]), runner=B.run_in_process)
    prof = r["results"][0]["profile"]
    cats = {c["category"] for c in prof["by_category"]}
    assert "dense GEMMs" in cats and prof["busy_ms"] > 0
    assert abs(sum(c["share"] for c in prof["by_category"]) - 1.0) < 1e-6


@pytest.mark.parametrize("kw, msg", [
    (dict(ours=False, baseline=False), "nothing to measure"),
    (dict(steps=0), "--steps"),
    (dict(model="7b"), "unknown model shape"),
    (dict(offload=True), "--offload shards states"),
    (dict(offload=True, gpus=2), "--offload needs CUDA"),
    (dict(in_process=True, gpus=2), "--in-process"),
    (dict(variant_specs=["experts=fast"]), "experts must be one of eager, grouped_mm, fused, got 'fast'"),
    (dict(variant_specs=["speed=2"]), "'speed=2' is not KEY=VALUE with KEY one of"),
    (dict(variant_specs=["recompute"]), "'recompute' is not KEY=VALUE"),
    (dict(variant_specs=["offload=yes"]), "offload shards states over FSDP2 ranks"),
    (dict(variant_specs=["lora_experts=some"]), "lora_experts must be no, all or layer numbers joined by"),
    (dict(variant_specs=["lora_experts=all,base=mxfp4"]), "cannot adapt experts kept in MXFP4"),
    (dict(method="full", variant_specs=["lora_experts=0"]), "lora_experts needs --method lora"),
    (dict(variant_specs=["masters=bf16"]), "masters=bf16 needs optim=adamw_8bit"),
    (dict(variant_specs=["optim=adamw_4bit"]), "optim must be one of adamw, adamw_8bit"),
    (dict(variant_specs=["qat=mxfp4"]), "qat quantises trained experts: use --method full or lora_experts=all"),
    (dict(method="full", variant_specs=["qat=mxfp4,base=mxfp4"]), "qat cannot train experts kept in MXFP4"),
    (dict(variant_specs=["qat=int4"]), "qat must be one of none, mxfp4"),
])
def test_bad_options_are_refused_before_anything_is_built(kw, msg):
    with pytest.raises(ValueError, match=msg):
        B.run_benchmark(tiny(**kw), runner=lambda v, o: pytest.fail("must not run"))


def test_cli_bad_option_is_one_line_error():
    from gptoss_cloud.main import main
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "from gptoss_cloud.main import main; main()", "bench", "--model", "tiny",
                          "--no-ours", "--device", "cpu"], capture_output=True, text=True)
    assert out.returncode == 1
    assert "error: nothing to measure" in out.stderr and "Traceback" not in out.stderr
    assert main  # imported for the entry point's existence


@pytest.mark.slow
def test_two_process_fsdp2_bench_on_cpu(tmp_path):
    """--gpus 2 on CPU: each variant is a 2-rank torchrun job (gloo), FSDP2 per decoder layer."""
    report = B.run_benchmark(tiny(gpus=2, method="full", steps=1, warmup=1))
    check_report(report, 2)
    for row in report["results"]:
        assert row["status"] == "ok", (row.get("error"), row.get("log_tail"))
        assert row["world_size"] == 2 and row["ranks_reported"] == 2
        assert row["tokens_per_s"] == pytest.approx(2 * row["tokens_per_s_per_gpu"])
    ours, ref = report["results"]
    assert ours["trainable_params"] == ref["trainable_params"] == ours["total_params"]  # full fine-tuning
