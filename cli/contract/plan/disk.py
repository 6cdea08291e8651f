"""Disk and store: one checkpoint's bytes (the one formula, used by the planner and the trainer's preflight), the
merged folder, the adapter, the base-weights cache, and what a node's disk and the store must hold."""

from __future__ import annotations

from dataclasses import dataclass

from gptoss_cloud.contract.plan.optim_bytes import checkpoint_bytes_per_param
from gptoss_cloud.contract.plan.sizes import BF16, FP32, GB, GiB, MXFP4_BYTES_PER_EXPERT_PARAM, lora_params, resolve_shape, trainable_params
from gptoss_cloud.contract.shapes import ModelShape
from gptoss_cloud.contract.spec import RunSpec


def checkpoint_bytes(shape: ModelShape, spec: RunSpec) -> float:
    """One training checkpoint: the trainable master weights and Adam moments (+ small metadata)."""
    return trainable_params(shape, spec) * checkpoint_bytes_per_param(spec.optim) + 1e6


def merged_bytes(shape: ModelShape) -> float:
    return shape.total_params * BF16


def adapter_bytes(shape: ModelShape, spec: RunSpec) -> float:
    return lora_params(shape, spec.method.lora) * FP32 if spec.method.kind == "lora" else 0.0


def base_weights_bytes(shape: ModelShape, spec: RunSpec) -> float:
    """What the per-node cache downloads: the published checkpoint (MXFP4 experts, bf16 rest)."""
    if spec.model.init == "random" or shape.name == "tiny":
        return 0.0
    experts = shape.expert_params_total
    return experts * MXFP4_BYTES_PER_EXPERT_PARAM + (shape.total_params - experts) * BF16


@dataclass
class DiskPlan:
    checkpoint_gb: float
    adapter_gb: float
    merged_gb: float
    base_weights_gb: float
    local_disk_per_node_gb: float      # node 0: cache + two checkpoint shards while writing + merge
    store_gb: float                    # keep_last checkpoints + merged + adapter
    local_disk_capacity_gb: float | None
    fits: bool


def disk_plan(spec: RunSpec, shape: ModelShape | None = None) -> DiskPlan:
    shape = resolve_shape(spec, shape)
    ckpt = checkpoint_bytes(shape, spec)
    merged = merged_bytes(shape) if spec.output.merge else 0.0
    adapter = adapter_bytes(shape, spec)
    base = base_weights_bytes(shape, spec)
    local = base + 2 * ckpt / spec.parallelism.nodes + merged
    store = spec.checkpoint.keep_last * ckpt + merged + adapter
    cap = spec.cluster.local_disk_gib
    cap_gb = cap * GiB / GB if cap is not None else None
    return DiskPlan(
        checkpoint_gb=round(ckpt / GB, 2), adapter_gb=round(adapter / GB, 3), merged_gb=round(merged / GB, 1),
        base_weights_gb=round(base / GB, 1), local_disk_per_node_gb=round(local / GB, 1), store_gb=round(store / GB, 1),
        local_disk_capacity_gb=round(cap_gb, 1) if cap_gb is not None else None,
        fits=cap_gb is None or local / GB <= cap_gb,
    )
