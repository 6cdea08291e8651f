"""A benchmark's report: the environment it ran in, each row's derived numbers (tokens/s, TFLOP/s, MFU, planned
memory), the JSON written under docs/benchmarks/, and the tables printed for it."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import subprocess
from dataclasses import asdict
from pathlib import Path

from gptoss_cloud.trainer.bench import metrics as BM
from gptoss_cloud.trainer.bench.variants import Variant
from gptoss_cloud.trainer.bench.run import BenchOptions, REPORT_VERSION, command_line


def environment(on_gpu: bool) -> dict:
    """Card, driver and library versions, host: what a reader needs to trust or reproduce a number."""
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": _version("transformers"),
           "peft": _version("peft"), "accelerate": _version("accelerate"), "gptoss_cloud": _version("gptoss-cloud"),
           "host": platform.node(), "cuda": torch.version.cuda, "driver": None, "card": "cpu", "card_memory_gib": None,
           "gpus_visible": 0}
    if on_gpu:
        props = torch.cuda.get_device_properties(0)
        env.update(card=props.name, card_memory_gib=round(props.total_memory / 1024**3, 1),
                   gpus_visible=torch.cuda.device_count(), driver=_driver_version())
    return env


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def planned_gib(opts: BenchOptions, variant: Variant, card: str, card_memory_gib: float | None) -> float | None:
    """The planner's predicted torch peak reserved GiB per GPU for our variant (None for the reference,
    whose full-logits loss the planner does not model)."""
    if variant.stack != "ours":
        return None
    from gptoss_cloud.contract.plan.memory import memory_plan

    from gptoss_cloud.trainer.bench.variants import plan_spec

    family, _ = BM.card_family(card)
    eff = variant.apply(opts.setup())
    if eff.recompute == "selective":  # the planner models full recomputation or none, not this
        return None
    spec = plan_spec(eff, variant, opts.gpus, family or "H100", card_memory_gib)
    return memory_plan(spec, suggest=False).gpu_reserved_gib


def derive(result: dict, opts: BenchOptions, shape, peak_tflops: float | None) -> dict:
    """Throughput, TFLOP/s and MFU of one measured variant (per GPU and total), FLOPs as it ran."""
    from gptoss_cloud.contract.plan.flops import training_flops

    row = dict(result)
    if result.get("recompute"):
        count = training_flops(shape, opts.method, result["recompute"], [opts.seq])
        row["flops"] = {"per_token": count.per_token, "dense_per_token": count.dense,
                        "attention_per_token": count.attention, "formula": count.formula}
    world = result.get("world_size") or opts.gpus
    ok = result["status"] == "ok" and result["step_times_s"]
    if ok:
        step = BM.median(result["step_times_s"])
        per_gpu = result["tokens_per_step"] / step
        tflops = BM.model_tflops(row["flops"]["per_token"], per_gpu) if "flops" in row else None
        row.update(median_step_s=step, tokens_per_s_per_gpu=per_gpu, tokens_per_s=per_gpu * world,
                   tflops_per_gpu=tflops, mfu=BM.mfu(tflops, peak_tflops) if tflops else None)
    else:
        row.update(median_step_s=None, tokens_per_s_per_gpu=None, tokens_per_s=None, tflops_per_gpu=None, mfu=None)
    row["label"] = (BM.oom_label(result.get("peak_reserved_gib")) if result["status"] == "oom"
                    else "ok" if ok else f"failed: {result.get('error')}")
    return row


def build_report(results: list[dict], opts: BenchOptions, env: dict) -> dict:
    """The JSON report: options, environment, formula, one row per variant, ratios to the best reference."""
    shape = opts.setup().shape()
    family, catalog_peak = BM.card_family(env["card"])
    peak = opts.peak_tflops or catalog_peak
    rows = [derive(r, opts, shape, peak) for r in results]
    reference = next((r for r in rows if r["variant"]["stack"] == "transformers"), None)
    base = reference["tokens_per_s_per_gpu"] if reference else None
    for r in rows:
        r["ratio_to_baseline"] = BM.ratio(r["tokens_per_s_per_gpu"], base)
        v = Variant.from_dict(r["variant"])
        try:
            r["planned_reserved_gib"] = planned_gib(opts, v, env["card"], env.get("card_memory_gib"))
        except Exception as e:  # the planner refusing a shape must not lose the measurements
            r["planned_reserved_gib"] = None
            r["plan_error"] = str(e)
    now = _dt.datetime.now(_dt.timezone.utc)
    return {
        "report_version": REPORT_VERSION,
        "date": now.date().isoformat(),
        "timestamp": now.isoformat(timespec="seconds"),
        "command": command_line(opts),
        "environment": env,
        "options": asdict(opts),
        "shape": {"name": shape.name, "layers": shape.num_hidden_layers, "total_params": shape.total_params,
                  "active_params": shape.active_params, "experts": shape.num_local_experts},
        "tokens_per_step_per_gpu": opts.seq,
        "flops": {"formula": "per row: results[].flops.formula (gptoss_cloud.contract.plan.flops, for what each row ran)",
                  "peak_tflops_per_gpu": peak, "peak_source": "--peak-tflops" if opts.peak_tflops else (family or None)},
        "baseline": reference["variant"]["name"] if reference else None,
        "results": rows,
    }


def default_out(env: dict, date: str, root: Path = Path("docs/benchmarks")) -> Path:
    return root / f"{date}-{BM.card_slug(env['card'])}.json"


def write_report(report: dict, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return out


def profile_tables(report: dict) -> list:
    """One rich Table per profiled variant: milliseconds by category, then the top ops."""
    from rich.table import Table

    tables = []
    for r in report["results"]:
        prof = r.get("profile")
        if not prof:
            continue
        t = Table(title=f"{r['variant']['name']}: one profiled step, {prof['wall_ms']:.1f} ms wall, "
                        f"{prof['busy_ms']:.1f} ms busy ({prof['measure']})", title_justify="left")
        for col, just in [("category / op", "left"), ("ms", "right"), ("share", "right"), ("calls", "right")]:
            t.add_column(col, justify=just)
        for c in prof["by_category"]:
            t.add_row(c["category"], _f(c["ms"], ".1f"), _f(c["share"], ".1%"), "")
        t.add_section()
        for op in prof["top_ops"][:12]:
            t.add_row(f"[dim]{op['name'][:70]}[/]", _f(op["ms"], ".1f"), "", str(op["calls"]))
        tables.append(t)
    return tables


def _f(v, fmt: str, none: str = "—") -> str:
    return none if v is None else format(v, fmt)


def report_table(report: dict):
    """A rich Table: one row per variant."""
    from rich.table import Table

    env = report["environment"]
    o = report["options"]
    shape = report["shape"]
    title = (f"{shape['name']} {o['method']} · seq {o['seq']} · {o['gpus']} x {env['card']} · "
             f"torch {env['torch']} · transformers {env['transformers']} · median of {o['steps']} steps after {o['warmup']} warm-up")
    t = Table(title=title, title_justify="left")
    for col, just in [("variant", "left"), ("tokens/s", "right"), ("tokens/s/GPU", "right"), ("TFLOP/s/GPU", "right"),
                      ("MFU", "right"), ("peak alloc GiB", "right"), ("peak reserved GiB", "right"),
                      ("planned GiB", "right"), ("x baseline", "right"), ("status", "left")]:
        t.add_column(col, justify=just)
    for r in report["results"]:
        t.add_row(
            r["variant"]["name"], _f(r["tokens_per_s"], ",.0f"), _f(r["tokens_per_s_per_gpu"], ",.0f"),
            _f(r["tflops_per_gpu"], ".1f"), _f(r["mfu"], ".1%"), _f(r["peak_allocated_gib"], ".1f"),
            _f(r["peak_reserved_gib"], ".1f"), _f(r.get("planned_reserved_gib"), ".1f"),
            _f(r["ratio_to_baseline"], ".2f"), r["label"],
        )
    t.caption = (f"MFU: each row's FLOPs for the recomputation it ran (gptoss_cloud.contract.plan.flops), "
                 f"peak {report['flops']['peak_tflops_per_gpu'] or 'unknown'} TFLOP/s per GPU")
    return t
