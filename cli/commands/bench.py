"""`bench`: time our training step against the transformers + peft reference on this machine's GPUs."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer


class BenchModel(str, Enum):
    b20 = "20b"
    b120 = "120b"
    tiny = "tiny"


class Method(str, Enum):
    lora = "lora"
    full = "full"


class Experts(str, Enum):
    eager = "eager"
    grouped_mm = "grouped_mm"
    fused = "fused"


class Attention(str, Enum):
    eager = "eager"
    flex = "flex"
    hf_flex = "hf_flex"


class BaseFormat(str, Enum):
    bf16 = "bf16"
    mxfp4 = "mxfp4"


class Recompute(str, Enum):
    auto = "auto"
    full = "full"
    selective = "selective"
    none = "none"


class Dequant(str, Enum):
    auto = "auto"
    torch = "torch"
    triton = "triton"
    gemm = "gemm"


class Device(str, Enum):
    cuda = "cuda"
    cpu = "cpu"


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)


def bench(
    ctx: typer.Context,
    model: Annotated[BenchModel, typer.Option("--model", help="model shape (random weights)")] = BenchModel.b20,
    layers: Annotated[Optional[int], typer.Option("--layers", min=1, help="reduced depth (default: the model's)")] = None,
    method: Annotated[Method, typer.Option("--method", help="LoRA r=16 on attention, or full fine-tuning")] = Method.lora,
    seq: Annotated[int, typer.Option("--seq", min=16, help="tokens per packed sequence (one per GPU per step)")] = 4096,
    steps: Annotated[int, typer.Option("--steps", min=1, help="timed steps (the median is reported)")] = 5,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="untimed steps first")] = 3,
    baseline: Annotated[bool, typer.Option("--baseline", help="also time transformers + peft in its best configuration")] = False,
    baseline_eager: Annotated[bool, typer.Option("--baseline-eager", help="also time the reference with eager experts and attention")] = False,
    ours: Annotated[bool, typer.Option("--ours/--no-ours", help="time our trainer's step")] = True,
    experts: Annotated[Optional[Experts], typer.Option("--experts", help="our experts kernel (default: grouped_mm on GPU, eager on CPU)")] = None,
    attention: Annotated[Optional[Attention], typer.Option("--attention", help="our attention kernel (default: flex on GPU, eager on CPU)")] = None,
    gpus: Annotated[int, typer.Option("--gpus", min=1, help="GPUs (>1: FSDP2 under torchrun, NCCL)")] = 1,
    offload: Annotated[bool, typer.Option("--offload", help="FSDP2 CPU offload of sharded states")] = False,
    lora_r: Annotated[int, typer.Option("--lora-r", min=1, help="LoRA rank")] = 16,
    base_format: Annotated[BaseFormat, typer.Option("--base-format", help="ours: frozen experts in bf16, or kept in MXFP4 (LoRA only)")] = BaseFormat.bf16,
    recompute: Annotated[Recompute, typer.Option("--recompute", help="activation checkpointing per decoder layer: auto (the trainer's default: off when the planner finds it fits this card), full, selective (GEMM outputs kept) or none")] = Recompute.auto,
    dequant: Annotated[Dequant, typer.Option("--dequant", help="MXFP4 base: dequantise with the Triton kernel when installed (auto), torch ops or Triton, or decode inside the grouped GEMM (gemm)")] = Dequant.auto,
    compile_layers: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="ours: torch.compile each decoder layer's forward (default: on GPU, as the trainer)")] = None,
    variant: Annotated[Optional[list[str]], typer.Option("--variant", help="one of our configurations, e.g. 'experts=fused,recompute=none,base=mxfp4,dequant=triton' (repeatable; keys: experts, attention, offload, base, recompute, dequant, compile, lora_experts=no|all|0+12+24, optim=adamw|adamw_8bit, masters=fp32|bf16)")] = None,
    profile: Annotated[bool, typer.Option("--profile", help="one more step per variant under torch.profiler: device time by kernel category")] = False,
    peak_tflops: Annotated[Optional[float], typer.Option("--peak-tflops", min=1, help="peak bf16 TFLOP/s per GPU for MFU (default: the card's datasheet figure)")] = None,
    device: Annotated[Optional[Device], typer.Option("--device", help="default: cuda when available")] = None,
    in_process: Annotated[bool, typer.Option("--in-process", help="measure every variant in this process (one GPU; peaks reset between)")] = False,
    timeout: Annotated[float, typer.Option("--timeout", min=10, help="seconds per variant before it is recorded as failed")] = 1800.0,
    out: Annotated[Optional[Path], typer.Option("--out", help="JSON report (default docs/benchmarks/<date>-<card>.json); with --suite, the folder for its reports and logs (default bench-out/<suite>)")] = None,
    suite: Annotated[Optional[str], typer.Option("--suite", help="run a named suite of benchmarks (the sets docs/benchmarks.md reports; --list shows them)")] = None,
    list_suites: Annotated[bool, typer.Option("--list", help="list the suites and exit")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="with --suite: check every step and print its command line; run nothing")] = False,
) -> None:
    """Benchmark a training step at the real shapes with random weights; print a table, write JSON."""
    if suite is not None or list_suites or dry_run:
        raise typer.Exit(_suite(ctx, suite, list_suites, dry_run, out))
    from rich.console import Console

    from gptoss_cloud.contract.errors import GptossError
    from gptoss_cloud.trainer.bench.run import BenchOptions, run_benchmark
    from gptoss_cloud.trainer.bench.report import default_out, profile_tables, report_table, write_report

    opts = BenchOptions(
        model=model.value, layers=layers, method=method.value, seq=seq, steps=steps, warmup=warmup, ours=ours,
        baseline=baseline, baseline_eager=baseline_eager, experts=experts.value if experts else None,
        attention=attention.value if attention else None, gpus=gpus, offload=offload, lora_r=lora_r,
        base_format=base_format.value, recompute=recompute.value, dequant=dequant.value, compile=compile_layers,
        variant_specs=list(variant) if variant else None, profile=profile,
        peak_tflops=peak_tflops, in_process=in_process, timeout_s=timeout,
        device=device.value if device else None,
    )
    console = Console(highlight=False)

    def progress(r: dict) -> None:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error')}"
        console.print(f"[dim]measured[/] {r['variant']['name']}: {status}")

    try:
        report = run_benchmark(opts, on_result=progress)
    except ValueError as e:
        raise GptossError(str(e), hint="see `gptoss-cloud bench --help`") from None
    path = write_report(report, out or default_out(report["environment"], report["date"]))
    console.print(report_table(report))
    for table in profile_tables(report):
        console.print(table)
    console.print(f"report: {path}")


SUITE_OPTIONS = {"suite", "list_suites", "dry_run", "out"}


def _suite(ctx: typer.Context, name: Optional[str], list_suites: bool, dry_run: bool, out: Optional[Path]) -> int:
    from gptoss_cloud.contract.errors import GptossError
    from gptoss_cloud.suites.parse import SuiteError, dry_run_lines, get_suite, list_lines, load_suites
    from gptoss_cloud.suites.run import run_suite

    # By name: typer may bring its own copy of click, whose ParameterSource is not click's.
    given = sorted(f"--{p.replace('_', '-')}" for p in ctx.params
                   if p not in SUITE_OPTIONS and getattr(ctx.get_parameter_source(p), "name", None) == "COMMANDLINE")
    if given:  # a suite's steps carry their own options; a flag here would silently not apply
        raise GptossError(f"{', '.join(given)} cannot be combined with --suite/--list/--dry-run",
                          hint="each suite step has its options in the suite file")
    try:
        suites = load_suites()
        if list_suites:
            for line in list_lines(suites):
                typer.echo(line)
            return 0
        if name is None:
            raise SuiteError("--dry-run needs --suite NAME")
        s = get_suite(name, suites)
        folder = (out or Path("bench-out") / s.name).absolute()
        if dry_run:
            for line in dry_run_lines(s, folder):
                typer.echo(line)
            return 0
        run_suite(s, folder)
    except SuiteError as e:
        raise GptossError(str(e)) from None
    typer.echo(f"suite {s.name}: every step passed; reports and logs in {folder}")
    return 0
