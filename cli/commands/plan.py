"""`plan`: GPU/host memory, disk, store, time and cost of a spec; no side effects."""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated, Optional

import typer

from gptoss_cloud.commands.common import SpecArg, resolve


class PlanFormat(str, Enum):
    table = "table"
    json = "json"


class Method(str, Enum):
    lora = "lora"
    full = "full"


def register(app: typer.Typer) -> None:
    app.command("plan")(plan)


def plan(
    spec: SpecArg = None,
    model: Annotated[Optional[str], typer.Option("--model", help="20b | 120b | …; overrides the spec")] = None,
    nodes: Annotated[Optional[int], typer.Option("--nodes", min=1, help="overrides the spec")] = None,
    gpus_per_node: Annotated[Optional[int], typer.Option("--gpus-per-node", min=1, max=16, help="overrides the spec")] = None,
    method: Annotated[Optional[Method], typer.Option("--method", help="overrides the spec")] = None,
    gpu_price: Annotated[Optional[float], typer.Option("--gpu-price", min=0, help="USD per GPU-hour; overrides cluster.gpu_price_per_hour")] = None,
    tokens: Annotated[Optional[float], typer.Option("--tokens", min=1, help="dataset size in tokens (for wall time when optim.max_steps is unset)")] = None,
    mfu: Annotated[Optional[float], typer.Option("--mfu", min=0.01, max=1.0, help="assumed model FLOPs utilisation (default 0.25)")] = None,
    output: Annotated[PlanFormat, typer.Option("-o", "--output", help="table | json")] = PlanFormat.table,
    longest: Annotated[bool, typer.Option("--longest", help="also find the longest data.max_seq_len (a multiple of 1024) that fits these GPUs, all else as the spec says")] = False,
) -> None:
    """Plan memory, disk, time and cost for a run (exit 1 if it cannot fit). Talks to no server."""
    from gptoss_cloud.contract.plan.run import longest_seq, plan_run
    from gptoss_cloud.contract.plan.configs import configs_table, configurations
    from gptoss_cloud.contract.plan.serving import serving_plan
    from gptoss_cloud.contract.plan.sizes import resolve_shape

    s = resolve(
        spec, model__name=model, parallelism__nodes=nodes, parallelism__gpus_per_node=gpus_per_node,
        method__kind=method.value if method else None, cluster__gpu_price_per_hour=gpu_price,
    )
    from gptoss_cloud.contract.plan.sizes import local_shape

    shape = local_shape(s.model.name, s.model.layers)
    rp = plan_run(s, shape, dataset_tokens=tokens, gpu_price=gpu_price, mfu=mfu)
    ls = longest_seq(s, shape) if longest else None
    configs = configurations(s, shape)
    sp = serving_plan(s, resolve_shape(s, shape))
    if output is PlanFormat.json:
        extra = {"configurations": [c.to_dict() for c in configs], "serving": sp.to_dict()}
        extra |= {"longest_seq": ls.to_dict()} if ls else {}
        typer.echo(json.dumps(rp.to_dict() | extra, indent=2))
    else:
        from rich.console import Console

        Console(highlight=False).print(*plan_tables(rp), configs_table(configs, s), serving_table(sp))
        if ls:
            Console(highlight=False).print(longest_line(ls))
    if not rp.fits:
        raise typer.Exit(1)


def longest_line(ls) -> str:
    if ls.tokens is None:
        line = f"longest data.max_seq_len: not even {ls.step:,} tokens fit {ls.gpu_capacity_gib:.1f} GiB per GPU"
    else:
        line = (f"longest data.max_seq_len that fits: {ls.tokens:,} tokens ({ls.gpu_total_gib:.1f} of "
                f"{ls.gpu_capacity_gib:.1f} GiB per GPU, layers {'recomputed' if ls.recompute else 'not recomputed'}; "
                f"a projection)")
    if ls.long_context_settings:
        with_lc = f"{ls.with_long_context:,} tokens" if ls.with_long_context else "nothing fits"
        settings = ", ".join(f"{k}: {str(v).lower()}" for k, v in ls.long_context_settings.items())
        line += f"\nwith {settings} (docs/long-context.md): {with_lc}"
    return line


def serving_table(sp):
    """Serving the merged model with vLLM, both formats side by side (docs/serving-sizes.md)."""
    from rich.table import Table

    t = Table(title=f"Serving with vLLM on {sp.gpu_type} (serve uses {sp.serve_format} for this spec; docs/serving-sizes.md)",
              title_justify="left")
    for col in ("format", "weights GB", "GPUs (TP)", "GiB per GPU / budget", "full-length sequences the KV holds"):
        t.add_column(col, justify="left" if col == "format" else "right")
    for fmt, z in sp.sizes.items():
        mark = " (serve)" if fmt == sp.serve_format else ""
        if isinstance(z, Exception):
            t.add_row(fmt + mark, "", "does not fit", "", z.message[:120])
            continue
        t.add_row(fmt + mark, f"{z.weights_gib * 2**30 / 1e9:,.1f}", str(z.tp), f"{z.per_gpu_gib:.1f} / {z.budget_gib:.1f}",
                  f"{z.sequences_held} of {z.max_model_len:,} tokens (asked: {z.kv_sequences})",
                  style="bold" if mark else None)
    return t


def plan_tables(rp) -> list:
    """Rich renderables for a RunPlan: memory breakdown, disk/store, time/cost, verdict."""
    from rich.table import Table
    from rich.text import Text

    m, d, t = rp.memory, rp.disk, rp.time
    title = f"{m.model} {m.method} on {m.nodes} node(s) x {m.gpus_per_node} {m.gpu_type}"
    gpu = Table(title=f"GPU memory per GPU — {title}", show_header=True, title_justify="left")
    gpu.add_column("component")
    gpu.add_column("GiB", justify="right")
    for k, v in m.gpu.items():
        gpu.add_row(k, f"{v:.2f}")
    gpu.add_row("torch peak reserved (x allocator overhead)", f"{m.gpu_reserved_gib:.1f}", style="bold")
    gpu.add_row("+ CUDA context, NCCL", f"{m.gpu_total_gib:.1f}", style="bold")
    gpu.add_row("usable on this GPU", f"{m.gpu_capacity_gib:.1f}")

    host = Table(title="Host memory per node", title_justify="left")
    host.add_column("component")
    host.add_column("GiB", justify="right")
    for k, v in m.host.items():
        host.add_row(k, f"{v:.1f}")
    host.add_row("total / usable", f"{m.host_total_gib:.0f} / {m.host_capacity_gib:.0f}", style="bold")

    disk = Table(title="Disk and store", title_justify="left")
    disk.add_column("what")
    disk.add_column("GB", justify="right")
    disk.add_row("one checkpoint (trainable weights + Adam moments)", f"{d.checkpoint_gb:,.2f}")
    if d.adapter_gb:
        disk.add_row("adapter", f"{d.adapter_gb:,.3f}")
    disk.add_row("merged bf16 model", f"{d.merged_gb:,.1f}")
    disk.add_row("base weights cache per node", f"{d.base_weights_gb:,.1f}")
    cap = f" of {d.local_disk_capacity_gb:,.0f}" if d.local_disk_capacity_gb is not None else ""
    disk.add_row("local disk, node 0 (cache + 2 checkpoints + merge)", f"{d.local_disk_per_node_gb:,.1f}{cap}")
    disk.add_row("store (keep_last checkpoints + merged + adapter)", f"{d.store_gb:,.1f}", style="bold")

    tt = Table(title=f"Time and cost (assumed MFU {t.mfu:.0%} of {t.peak_tflops_per_gpu:.0f} TFLOPS bf16 per GPU)", title_justify="left")
    tt.add_column("what")
    tt.add_column("value", justify="right")
    tt.add_row("training FLOPs per token", f"{t.flops_per_token / 1e9:.1f} GFLOP")
    tt.add_row("tokens per step", f"{t.tokens_per_step:,}")
    tt.add_row("step time", f"{t.step_time_s:.2f} s")
    tt.add_row("throughput", f"{t.tokens_per_s:,.0f} tokens/s")
    if t.steps:
        tt.add_row("steps", f"{t.steps:,}")
        tt.add_row("wall time", f"{t.wall_time_h:.2f} h")
        tt.add_row("GPU-hours", f"{t.gpu_hours:,.1f}")
        tt.add_row("cost", f"${t.cost_usd:,.2f}" if t.cost_usd is not None else "set cluster.gpu_price_per_hour or --gpu-price")
    if t.note:
        tt.add_row("note", t.note)

    out: list = [gpu, host, disk, tt]
    if rp.fits:
        out.append(Text("fits", style="bold green"))
    else:
        lines = ["does not fit: " + "; ".join(m.problems or ["local disk too small"])]
        lines += [f"  would fit: {s}" for s in m.suggestions]
        out.append(Text("\n".join(lines), style="bold red"))
    return out
