"""The configurations a spec could run with on its nodes and GPUs, and which of them is fastest.

``gptoss-cloud plan`` prints one row per (optimizer, CPU offload, recomputation, expert units): memory per GPU and
host memory per node from :func:`plan.memory_plan`, and a projected step time = compute (the
planner's FLOPs at its assumed MFU) + the optimizer step (memory-bound: the bytes it reads and writes
at a fraction of the card's bandwidth) + with offload the host step and the parameter / gradient
copies, neither overlapped with compute today. Each term is an assumption written down below, to be
replaced by measurements (docs/optimizers.md). Splitting the experts into FSDP2 units
(``parallelism.expert_units``) changes only the buffers' sizes in this model, not the projected time (the
collectives move the same bytes, in more pieces): where both fit, the unsplit row comes first and wins.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from gptoss_cloud.contract.plan.optim_bytes import MASTER_BYTES, QUANT_BLOCK, label
from gptoss_cloud.contract.plan.memory import expert_units_option, memory_plan, with_settings
from gptoss_cloud.contract.plan.cost import time_plan
from gptoss_cloud.contract.plan.gpus import gpu_info
from gptoss_cloud.contract.plan.sizes import resolve_shape, trainable_params
from gptoss_cloud.contract.shapes import ModelShape
from gptoss_cloud.contract.spec import RunSpec

# (optim.name, optim.master_weights) the table tries; offload only with fp32 AdamW, the one measured.
OPTIMIZERS = (("adamw", "fp32"), ("adamw_8bit", "fp32"), ("adamw_8bit", "bf16"))
OFFLOAD_OPTIMIZERS = (("adamw", "fp32"),)

# ---- assumptions ---------------------------------------------------------------------------------
HBM_TBPS = {"H100": 3.35, "H200": 4.8, "GH200": 4.0, "B200": 8.0, "A100": 2.0, "A100-40GB": 1.55, "L40S": 0.86}
HBM_FRACTION = 0.5        # of the card's bandwidth an optimizer step reaches (many tensors, small kernels)
HOST_GBPS_PER_RANK = 25.0  # host memory bandwidth one rank's offloaded Adam step gets (a node's ~200 GB/s / 8)
PCIE_GBPS = 25.0          # host <-> device copy rate per GPU (PCIe 5 x16, pinned, achieved)


def step_bytes_per_param(name: str, masters: str) -> float:
    """What one Adam step reads and writes per parameter: weight, gradient, m, v in; weight, m, v out."""
    w = MASTER_BYTES[masters]
    moment = 4.0 if name == "adamw" else 1 + 4 / QUANT_BLOCK
    return (w + w + 2 * moment) + (w + 2 * moment)


@dataclass
class Config:
    optimizer: str            # optim_bytes.label
    name: str
    master_weights: str
    cpu_offload: bool
    recompute: bool
    expert_units: int
    gpu_gib: float
    gpu_capacity_gib: float
    host_gib: float
    host_capacity_gib: float
    fits: bool
    compute_s: float
    optimizer_s: float
    transfer_s: float
    step_s: float
    fastest: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def configurations(spec: RunSpec, shape: ModelShape | None = None) -> list[Config]:
    """Every configuration of the table for ``spec``'s model, method, nodes and GPUs; the fastest that
    fits is marked."""
    shape = resolve_shape(spec, shape)
    split = expert_units_option(spec, shape)
    units = (spec.parallelism.expert_units,) + ((split,) if split else ())
    rows = []
    for offload in (False, True):
        if offload and spec.world_size < 2:
            continue  # FSDP2's offload shards the states over ranks
        for n in units[:1] if offload else units:
            for name, masters in OFFLOAD_OPTIMIZERS if offload else OPTIMIZERS:
                for recompute in (False, True):
                    rows.append(_row(spec, shape, name, masters, offload, recompute, n))
    fitting = [r for r in rows if r.fits]
    if fitting:
        min(fitting, key=lambda r: r.step_s).fastest = True
    return rows


def fastest(configs: list[Config]) -> Config | None:
    return next((c for c in configs if c.fastest), None)


def _row(spec: RunSpec, shape: ModelShape, name: str, masters: str, offload: bool, recompute: bool,
         expert_units: int = 1) -> Config:
    cand = with_settings(spec, optim__name=name, optim__master_weights=masters, parallelism__cpu_offload=offload,
                         parallelism__activation_checkpointing=recompute, parallelism__expert_units=expert_units)
    mp = memory_plan(cand, shape, suggest=False)
    compute = time_plan(cand, shape).step_time_s
    per_rank = trainable_params(shape, cand) / cand.world_size
    moved = per_rank * step_bytes_per_param(name, masters)
    if offload:
        optimizer_s = moved / (HOST_GBPS_PER_RANK * 1e9)
        # the fp32 shard in and the fp32 gradient shard out, every step
        transfer_s = per_rank * 2 * MASTER_BYTES[masters] / (PCIE_GBPS * 1e9)
    else:
        card = cand.cluster.gpu_type.upper().replace("_", "-")
        optimizer_s = moved / (HBM_TBPS.get(card, 3.35) * 1e12 * HBM_FRACTION)
        transfer_s = 0.0
    return Config(
        optimizer=label(cand.optim), name=name, master_weights=masters, cpu_offload=offload, recompute=recompute,
        expert_units=expert_units,
        gpu_gib=mp.gpu_total_gib, gpu_capacity_gib=mp.gpu_capacity_gib, host_gib=mp.host_total_gib,
        host_capacity_gib=mp.host_capacity_gib, fits=mp.fits, compute_s=round(compute, 3),
        optimizer_s=round(optimizer_s, 3), transfer_s=round(transfer_s, 3),
        step_s=round(compute + optimizer_s + transfer_s, 3),
    )


def configs_table(configs: list[Config], spec: RunSpec):
    """A rich Table of the configurations, the fastest that fits marked."""
    from rich.table import Table

    card = gpu_info(spec)
    t = Table(title=f"Configurations on {spec.parallelism.nodes} x {spec.parallelism.gpus_per_node} "
                    f"{spec.cluster.gpu_type} ({card.memory_gib:.0f} GiB; projected step times)", title_justify="left")
    # optimizer/masters; the three parts of the projected step time, then their sum.
    for col in ("optimizer", "offload", "recompute", "expert units", "GiB/GPU", "host GiB/node", "compute s", "optim s",
                "copies s", "step s", ""):
        t.add_column(col, justify="left" if col in ("optimizer", "") else "right")
    for c in configs:
        verdict = "fastest that fits" if c.fastest else ("fits" if c.fits else "does not fit")
        t.add_row(f"{c.name}/{c.master_weights}", "yes" if c.cpu_offload else "no", "yes" if c.recompute else "no",
                  str(c.expert_units), f"{c.gpu_gib:.1f} / {c.gpu_capacity_gib:.0f}", f"{c.host_gib:.0f} / {c.host_capacity_gib:.0f}",
                  f"{c.compute_s:.2f}", f"{c.optimizer_s:.2f}", f"{c.transfer_s:.2f}", f"{c.step_s:.2f}", verdict,
                  style="bold green" if c.fastest else (None if c.fits else "dim"))
    return t


# ---- what submit runs --------------------------------------------------------------------------------
CHOICE_FIELDS = (("optim", "name"), ("optim", "master_weights"), ("parallelism", "cpu_offload"),
                 ("parallelism", "activation_checkpointing"), ("parallelism", "expert_units"))


def named_by_spec(spec: RunSpec) -> list[str]:
    """The configuration settings the spec itself names (a file, a flag or GPTOSS_*), as dotted keys."""
    return [f"{section}.{field}" for section, field in CHOICE_FIELDS
            if field in getattr(spec, section).model_fields_set]


def choose(spec: RunSpec, shape: ModelShape | None = None) -> tuple[RunSpec, str | None]:
    """The configuration ``submit`` runs: the spec's own when it names any of :data:`CHOICE_FIELDS`, else the
    fastest of :func:`configurations` that fits, with a line saying what was chosen and why (None: the spec's
    defaults are already the fastest that fits, or nothing fits and the fit check will say so)."""
    from gptoss_cloud.contract.plan.memory import recompute_on

    if named_by_spec(spec):
        return spec, None
    shape = resolve_shape(spec, shape)
    best = fastest(configurations(spec, shape))
    if best is None:
        return spec, None
    p = spec.parallelism
    current = (spec.optim.name, spec.optim.master_weights, p.cpu_offload, recompute_on(spec, shape), p.expert_units)
    if current == (best.name, best.master_weights, best.cpu_offload, best.recompute, best.expert_units):
        return spec, None
    chosen = with_settings(spec, optim__name=best.name, optim__master_weights=best.master_weights,
                           parallelism__cpu_offload=best.cpu_offload, parallelism__activation_checkpointing=best.recompute,
                           parallelism__expert_units=best.expert_units)
    units = f", expert_units {best.expert_units}" if best.expert_units != 1 else ""
    note = (f"configuration: {best.optimizer}, cpu_offload {str(best.cpu_offload).lower()}, activation_checkpointing "
            f"{str(best.recompute).lower()}{units} — the fastest that fits {spec.parallelism.nodes} x {spec.parallelism.gpus_per_node} "
            f"{spec.cluster.gpu_type} ({best.gpu_gib:.1f} GiB/GPU, {best.step_s:.2f} s/step projected; `gptoss-cloud plan` "
            f"shows every configuration). Set optim.name or parallelism.cpu_offload in the spec to choose yourself.")
    return chosen, note
