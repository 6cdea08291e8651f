"""`gptoss-cloud bench`: our training step against the transformers + peft reference, same card, same run.

Flow: options -> the variants to measure -> each variant in its own process (torchrun with NCCL
for several GPUs, so peaks are clean and a crash stays local) -> per-variant raw measurements ->
derived numbers (tokens/s, TFLOP/s, MFU, ratio to the best reference, the planner's prediction) ->
one JSON report + a table. Arithmetic lives in ``bench_metrics``; building and stepping in
``bench_variants``; measuring one variant in ``bench_worker``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from gptoss_cloud.contract.sections import MAX_SEQ_LEN

from gptoss_cloud.trainer.bench.variants import Setup, Variant, long_context_problem

REPORT_VERSION = 2  # 2: FLOPs per row, for the recomputation each variant ran
# The reference's best configuration on GPU (issue 8); on CPU flex/grouped_mm are not what a user
# would run, so the CPU reference (tests) uses the eager kernels.
BEST_REFERENCE_GPU = ("grouped_mm", "flex")


@dataclass
class BenchOptions:
    model: str = "20b"
    layers: int | None = None
    method: str = "lora"
    seq: int = 4096
    steps: int = 5
    warmup: int = 3
    ours: bool = True
    baseline: bool = False
    baseline_eager: bool = False
    experts: str | None = None  # ours; None = grouped_mm on GPU, eager on CPU
    attention: str | None = None  # ours; None = flex on GPU, eager on CPU
    gpus: int = 1
    offload: bool = False
    lora_r: int = 16
    base_format: str = "bf16"  # ours: frozen experts in bf16 or kept in MXFP4
    recompute: str = "auto"  # auto (the trainer's default) | full | selective | none
    dequant: str = "auto"  # MXFP4 experts: auto (Triton when installed) | torch | triton
    compile: bool | None = None  # ours: torch.compile each decoder layer's forward (None: on GPU, as the trainer)
    variant_specs: list[str] | None = None  # --variant KEY=VALUE,...: several of our configurations in one run
    profile: bool = False  # one extra step under torch.profiler per variant: where the step's time goes
    loss_chunk_tokens: int = 1024
    seed: int = 0
    peak_tflops: float | None = None
    in_process: bool = False
    timeout_s: float | None = 1800.0
    device: str | None = None  # "cuda" | "cpu"; default: cuda when available

    def validate(self) -> None:
        from gptoss_cloud.contract.shapes import shape_for

        if self.method not in ("lora", "full"):
            raise ValueError(f"--method must be lora or full, got {self.method!r}")
        if self.steps < 1:
            raise ValueError("--steps must be >= 1 (the median needs at least one timed step)")
        if self.warmup < 0:
            raise ValueError("--warmup must be >= 0")
        if self.seq < 16:
            raise ValueError("--seq must be >= 16")
        if self.gpus < 1:
            raise ValueError("--gpus must be >= 1")
        if not (self.ours or self.baseline):
            raise ValueError("nothing to measure: pass --ours and/or --baseline")
        if self.offload and self.gpus < 2:
            raise ValueError("--offload shards states over FSDP2 ranks: use it with --gpus 2 or more")
        for text in self.variant_specs or []:
            v = parse_variant(text, self, on_gpu=True)  # raises ValueError naming the bad key or value
            if v.apply(self.setup()).offload and self.gpus < 2:
                raise ValueError(f"--variant {text!r}: offload shards states over FSDP2 ranks: use --gpus 2 or more")
        if self.in_process and self.gpus > 1:
            raise ValueError("--in-process runs one process: it cannot use --gpus > 1")
        shape_for(self.model, layers=self.layers)  # raises ValueError naming the model

    def setup(self) -> Setup:
        return Setup(model=self.model, layers=self.layers, method=self.method, seq=self.seq, lora_r=self.lora_r,
                     loss_chunk_tokens=self.loss_chunk_tokens, offload=self.offload, seed=self.seed,
                     base_format=self.base_format, recompute=self.recompute, dequant=self.dequant,
                     compile=self.compile)


# ------------------------------------------------------------------------------------------ variants
VARIANT_KEYS = {"experts": ("eager", "grouped_mm", "fused"), "attention": ("eager", "flex", "hf_flex"),
                "offload": ("yes", "no"), "base": ("bf16", "mxfp4"), "recompute": ("auto", "full", "selective", "none"),
                "dequant": ("auto", "torch", "triton", "gemm"), "compile": ("yes", "no"),
                # LoRA r on the experts too (method.lora.experts): of every layer, or of the layers named.
                "lora_experts": ("no", "all", "N+N+..."),
                # optim.name / optim.master_weights of our stack: optim=adamw_8bit,masters=bf16
                "optim": ("adamw", "adamw_8bit"), "masters": ("fp32", "bf16"),
                # parallelism.activation_offload / kernels.moe_tile_tokens (docs/long-context.md): act_offload=yes,moe_tile=32768
                "act_offload": ("yes", "no"), "moe_tile": ("N",),
                # method.qat: MXFP4 fake quantisation of the trained experts (full, or lora_experts)
                "qat": ("none", "mxfp4"),
                # parallelism.expert_units: each layer's experts as N FSDP2 units (N divides the experts)
                "expert_units": ("N",)}


def parse_variant(text: str, opts: BenchOptions, on_gpu: bool) -> Variant:
    """``experts=fused,recompute=none,base=mxfp4`` -> one of our variants (unset keys: the options')."""
    kv: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in VARIANT_KEYS:
            raise ValueError(f"--variant {text!r}: {item!r} is not KEY=VALUE with KEY one of {', '.join(VARIANT_KEYS)}")
        if key == "lora_experts" and value not in ("no", "all") and expert_layers(value) is None:
            raise ValueError(f"--variant {text!r}: lora_experts must be no, all or layer numbers joined by '+' "
                             f"(e.g. 0+12+24), got {value!r}")
        if key == "moe_tile" and not (value.isdigit() and int(value) <= MAX_SEQ_LEN):
            raise ValueError(f"--variant {text!r}: moe_tile must be a number of tokens up to {MAX_SEQ_LEN} (0: off), got {value!r}")
        if key == "expert_units" and not (value.isdigit() and 1 <= int(value) <= 128):
            raise ValueError(f"--variant {text!r}: expert_units must be a number of units from 1 to 128, got {value!r}")
        if key not in ("lora_experts", "moe_tile", "expert_units") and value not in VARIANT_KEYS[key]:
            raise ValueError(f"--variant {text!r}: {key} must be one of {', '.join(VARIANT_KEYS[key])}, got {value!r}")
        kv[key] = value
    overrides = {}
    for key in ("offload", "compile", "act_offload"):
        if key in kv:
            overrides[key] = kv[key] == "yes"
    for key in ("moe_tile", "expert_units"):
        if key in kv:
            overrides[key] = int(kv[key])
    if "base" in kv:
        overrides["base_format"] = kv["base"]
    for key in ("recompute", "dequant", "lora_experts", "optim", "masters", "qat"):
        if key in kv:
            overrides[key] = kv[key]
    problem = long_context_problem(overrides.get("recompute", opts.recompute), overrides.get("act_offload", False),
                                   overrides.get("moe_tile", 0))
    if problem:
        raise ValueError(f"--variant {text!r}: {problem}")
    if overrides.get("masters") == "bf16" and overrides.get("optim", "adamw") == "adamw":
        raise ValueError(f"--variant {text!r}: masters=bf16 needs optim=adamw_8bit (stochastic rounding)")
    if overrides.get("lora_experts", "no") != "no":
        if opts.method != "lora":
            raise ValueError(f"--variant {text!r}: lora_experts needs --method lora")
        if overrides.get("base_format", opts.base_format) == "mxfp4":
            raise ValueError(f"--variant {text!r}: lora_experts cannot adapt experts kept in MXFP4 (base=mxfp4)")
    if overrides.get("qat", "none") != "none":
        if opts.method == "lora" and overrides.get("lora_experts", "no") == "no":
            raise ValueError(f"--variant {text!r}: qat quantises trained experts: use --method full or lora_experts=all")
        if overrides.get("base_format", opts.base_format) == "mxfp4":
            raise ValueError(f"--variant {text!r}: qat cannot train experts kept in MXFP4 (base=mxfp4)")
    return ours_variant(opts, on_gpu, kv.get("experts"), kv.get("attention"), overrides)


def expert_layers(value: str) -> list[int] | None:
    """``0+12+24`` -> [0, 12, 24]; None when it is not that form."""
    parts = value.split("+")
    return [int(p) for p in parts] if all(p.isdigit() for p in parts) else None


def ours_variant(opts: BenchOptions, on_gpu: bool, experts: str | None = None, attention: str | None = None,
                 overrides: dict | None = None) -> Variant:
    experts = experts or opts.experts or ("fused" if on_gpu else "eager")
    attention = attention or opts.attention or ("flex" if on_gpu else "eager")
    eff = {"offload": opts.offload, "base_format": opts.base_format, "recompute": opts.recompute,
           "dequant": opts.dequant, "compile": on_gpu if opts.compile is None else opts.compile, **(overrides or {})}
    notes = []
    if eff["base_format"] == "mxfp4":
        notes.append(f"mxfp4 base, {eff['dequant']} dequant" if eff["dequant"] != "auto" else "mxfp4 base")
    if eff["recompute"] != "auto":
        notes.append(f"recompute {eff['recompute']}")
    if eff["compile"]:
        notes.append("compiled layers")
    if eff["offload"]:
        notes.append("cpu offload")
    if (ov := overrides or {}).get("optim", "adamw") != "adamw" or ov.get("masters", "fp32") != "fp32":
        notes.append(f"{ov.get('optim', 'adamw')}, {ov.get('masters', 'fp32')} masters")
    if (ov := overrides or {}).get("act_offload"):
        notes.append("activations offloaded")
    if ov.get("moe_tile"):
        notes.append(f"MoE tiles of {ov['moe_tile']:,}")
    if (le := ov.get("lora_experts", "no")) != "no":
        notes.append("LoRA on experts" + ("" if le == "all" else f" of layers {le.replace('+', ', ')}"))
    if (ov := overrides or {}).get("qat", "none") != "none":
        notes.append(f"{ov['qat']} QAT")
    if ov.get("expert_units", 1) != 1:
        notes.append(f"experts in {ov['expert_units']} units")
    name = f"ours ({experts} + {attention}{''.join(', ' + n for n in notes)})"
    return Variant(name, "ours", experts, attention, tuple(sorted((overrides or {}).items())))


def variants(opts: BenchOptions, on_gpu: bool) -> list[Variant]:
    """Ours first (one per --variant, else one from the options), then the reference's best
    configuration, then (optionally) the eager reference."""
    out = []
    if opts.ours:
        if opts.variant_specs:
            out += [parse_variant(t, opts, on_gpu) for t in opts.variant_specs]
        else:
            out.append(ours_variant(opts, on_gpu))
    if opts.baseline:
        experts, attention = BEST_REFERENCE_GPU if on_gpu else ("eager", "eager")
        ref_over = (("offload", opts.offload),) if opts.offload else ()
        out.append(Variant(f"transformers ({experts} + {attention}{', cpu offload' if opts.offload else ''})",
                           "transformers", experts, attention, ref_over))
        if opts.baseline_eager and (experts, attention) != ("eager", "eager"):
            out.append(Variant("transformers (eager + eager)", "transformers", "eager", "eager", ref_over))
    return out


# ------------------------------------------------------------------------------------------- runners
Runner = Callable[[Variant, BenchOptions], dict]


def run_in_process(variant: Variant, opts: BenchOptions) -> dict:
    """Measure in this process (memory freed and peaks reset between variants)."""
    from gptoss_cloud.trainer.bench.variants import join_process_group
    from gptoss_cloud.trainer.bench.worker import measure_variant

    rank = join_process_group()
    return merge_ranks([measure_variant(opts.setup(), variant, rank, opts.warmup, opts.steps, profile=opts.profile)])


def worker_command(opts: BenchOptions, job: Path, out: Path) -> list[str]:
    module = ["-m", "gptoss_cloud.trainer.bench.worker", "--job", str(job), "--out", str(out)]
    if opts.gpus > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={opts.gpus}", *module]
    return [sys.executable, *module]


def run_subprocess(variant: Variant, opts: BenchOptions) -> dict:
    """Measure in a fresh process (a torchrun job for several GPUs); a crash becomes an error row."""
    with tempfile.TemporaryDirectory(prefix="gptoss-bench-") as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "out"
        job.write_text(json.dumps({"setup": asdict(opts.setup()), "variant": variant.to_dict(),
                                   "warmup": opts.warmup, "steps": opts.steps, "profile": opts.profile}))
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if opts.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        cmd = worker_command(opts, job, out)
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=opts.timeout_s)
            rc, log = proc.returncode, (proc.stdout or "") + (proc.stderr or "")
        except subprocess.TimeoutExpired as e:
            rc, log = None, f"timed out after {opts.timeout_s:.0f} s\n" + _text(e.stdout) + _text(e.stderr)
        ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    if ranks:
        return merge_ranks(ranks)
    tail = [line for line in log.strip().splitlines() if line.strip()][-1:] or ["no output"]
    return failed_result(variant, f"worker exited with {rc}: {tail[0][:300]}", log_tail=log[-4000:])


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def failed_result(variant: Variant, error: str, log_tail: str | None = None) -> dict:
    return {"variant": variant.to_dict(), "status": "error", "error": error, "step_times_s": [], "losses": [],
            "world_size": None, "build_s": None, "trainable_params": None, "total_params": None,
            "tokens_per_step": None, "peak_allocated_gib": None, "peak_reserved_gib": None,
            "log_tail": log_tail}


def merge_ranks(ranks: list[dict]) -> dict:
    """One result from every rank's: timings from rank 0, peaks as the max over ranks, worst status."""
    ranks = sorted(ranks, key=lambda r: r.get("rank", 0))
    first = dict(ranks[0])
    bad = [r for r in ranks if r["status"] != "ok"]
    if bad:
        worst = next((r for r in bad if r["status"] == "oom"), bad[0])
        first.update(status=worst["status"], error=f"rank {worst.get('rank', 0)}: {worst['error']}")
    for key in ("peak_allocated_gib", "peak_reserved_gib"):
        vals = [r[key] for r in ranks if r.get(key) is not None]
        first[key] = max(vals) if vals else None
    first["ranks_reported"] = len(ranks)
    first.pop("rank", None)
    return first


# -------------------------------------------------------------------------------------------- report


def run_benchmark(opts: BenchOptions, runner: Runner | None = None, on_result: Callable[[dict], None] | None = None) -> dict:
    """Measure every variant of ``opts`` and return the report (nothing written)."""
    import torch

    opts.validate()
    on_gpu = (opts.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    if on_gpu and opts.gpus > torch.cuda.device_count():
        raise ValueError(f"--gpus {opts.gpus}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if not on_gpu and any(v.apply(opts.setup()).offload for v in variants(opts, on_gpu)):
        raise ValueError("--offload needs CUDA devices (it moves sharded states to pinned host memory)")
    opts.device = "cuda" if on_gpu else "cpu"
    runner = runner or (run_in_process if opts.in_process else run_subprocess)
    results = []
    for v in variants(opts, on_gpu):
        r = runner(v, opts)
        results.append(r)
        if on_result:
            on_result(r)
    from gptoss_cloud.trainer.bench.report import build_report, environment  # it reads this module's options

    return build_report(results, opts, environment(on_gpu))


def command_line(opts: BenchOptions) -> str:
    """The one command that reproduces ``opts`` (every setting spelled out, defaults included)."""
    args = ["gptoss-cloud", "bench", "--model", opts.model]
    if opts.layers:
        args += ["--layers", str(opts.layers)]
    args += ["--method", opts.method, "--seq", str(opts.seq), "--steps", str(opts.steps), "--warmup", str(opts.warmup)]
    if opts.gpus > 1:
        args += ["--gpus", str(opts.gpus)]
    args += ["--ours"] if opts.ours else ["--no-ours"]
    if opts.baseline:
        args.append("--baseline")
    if opts.baseline_eager:
        args.append("--baseline-eager")
    for flag, value in (("--experts", opts.experts), ("--attention", opts.attention), ("--peak-tflops", opts.peak_tflops),
                        ("--device", opts.device)):
        if value is not None:
            args += [flag, str(value)]
    if opts.lora_r != 16:
        args += ["--lora-r", str(opts.lora_r)]
    if opts.offload:
        args.append("--offload")
    if opts.base_format != "bf16":
        args += ["--base-format", opts.base_format]
    if opts.recompute != "auto":
        args += ["--recompute", opts.recompute]
    if opts.dequant != "auto":
        args += ["--dequant", opts.dequant]
    if opts.compile is not None:
        args.append("--compile" if opts.compile else "--no-compile")
    for text in opts.variant_specs or []:
        args += ["--variant", text]
    if opts.profile:
        args.append("--profile")
    if opts.in_process:
        args.append("--in-process")
    return shlex.join(args)


# --------------------------------------------------------------------------------------------- table


