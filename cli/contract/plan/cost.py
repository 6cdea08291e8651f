"""Step time, wall time, GPU-hours and cost at an assumed MFU, from the FLOPs that actually run."""

from __future__ import annotations

import math
from dataclasses import dataclass

from gptoss_cloud.contract.errors import PlanError
from gptoss_cloud.contract.plan.gpus import gpu_info
from gptoss_cloud.contract.plan.memory import ASSUMED_MFU, recompute_on
from gptoss_cloud.contract.plan.sizes import resolve_shape
from gptoss_cloud.contract.shapes import ModelShape
from gptoss_cloud.contract.spec import RunSpec


def flops_per_token(shape: ModelShape, spec: RunSpec) -> float:
    """Training FLOPs per token actually executed (``flops.training_flops``; recomputation as resolved),
    for rows of one ``max_seq_len`` document (packing shorter documents lowers only the attention term)."""
    from gptoss_cloud.contract.plan.flops import training_flops

    return training_flops(shape, spec.method.kind, recompute_on(spec, shape), [spec.data.max_seq_len]).per_token


@dataclass
class TimePlan:
    mfu: float
    peak_tflops_per_gpu: float
    flops_per_token: float
    tokens_per_step: int
    step_time_s: float
    tokens_per_s: float
    steps: int | None
    train_tokens: float | None
    wall_time_h: float | None
    gpu_hours: float | None
    gpu_price_per_hour: float | None
    cost_usd: float | None
    note: str = ""


def time_plan(
    spec: RunSpec, shape: ModelShape | None = None, *, dataset_tokens: float | None = None,
    gpu_price: float | None = None, mfu: float | None = None,
) -> TimePlan:
    """Step time, wall time, GPU-hours and cost at an assumed MFU (stated in the result).

    Steps come from ``optim.max_steps``, else ``epochs x dataset_tokens / tokens_per_step`` when the
    dataset size is known; otherwise only rates are given.
    """
    shape = resolve_shape(spec, shape)
    mfu = ASSUMED_MFU if mfu is None else mfu
    if not 0 < mfu <= 1:
        raise PlanError(f"mfu must be in (0, 1], got {mfu}")
    peak = gpu_info(spec).bf16_tflops
    fpt = flops_per_token(shape, spec)
    world = spec.world_size
    tps = mfu * peak * 1e12 * world / fpt
    tokens_per_step = spec.optim.micro_batch_size * spec.data.max_seq_len * spec.optim.grad_accum * world
    step_time = tokens_per_step / tps
    steps: int | None = None
    note = ""
    if spec.optim.max_steps:
        steps = spec.optim.max_steps
    elif dataset_tokens and spec.optim.epochs:
        steps = max(1, math.ceil(spec.optim.epochs * dataset_tokens / tokens_per_step))
    else:
        note = "wall time unknown: set optim.max_steps or pass the dataset size (--tokens)"
    price = gpu_price if gpu_price is not None else spec.cluster.gpu_price_per_hour
    wall_h = steps * step_time / 3600 if steps else None
    gpu_h = wall_h * world if wall_h is not None else None
    cost = gpu_h * price if (gpu_h is not None and price is not None) else None
    return TimePlan(
        mfu=mfu, peak_tflops_per_gpu=peak, flops_per_token=fpt, tokens_per_step=tokens_per_step,
        step_time_s=round(step_time, 3), tokens_per_s=round(tps, 1), steps=steps,
        train_tokens=steps * tokens_per_step if steps else None,
        wall_time_h=round(wall_h, 3) if wall_h is not None else None,
        gpu_hours=round(gpu_h, 2) if gpu_h is not None else None, gpu_price_per_hour=price,
        cost_usd=round(cost, 2) if cost is not None else None, note=note,
    )
