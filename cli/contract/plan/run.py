"""Everything ``gptoss-cloud plan`` shows (memory, disk, time, parameters), and the longest sequence that fits."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from gptoss_cloud.contract.plan.activations import long_context_settings
from gptoss_cloud.contract.plan.cost import TimePlan, time_plan
from gptoss_cloud.contract.plan.disk import DiskPlan, disk_plan
from gptoss_cloud.contract.plan.memory import MemoryPlan, _with, memory_plan, recompute_on
from gptoss_cloud.contract.plan.sizes import resolve_shape, trainable_params
from gptoss_cloud.contract.shapes import ModelShape
from gptoss_cloud.contract.spec import RunSpec
from gptoss_cloud.contract.sections import MAX_SEQ_LEN


@dataclass
class RunPlan:
    memory: MemoryPlan
    disk: DiskPlan
    time: TimePlan
    params: dict[str, int]

    @property
    def fits(self) -> bool:
        return self.memory.fits and self.disk.fits

    def to_dict(self) -> dict:
        return {"fits": self.fits, "params": self.params, "memory": asdict(self.memory), "disk": asdict(self.disk), "time": asdict(self.time)}


@dataclass
class LongestSeq:
    tokens: int | None          # the longest data.max_seq_len that fits the GPUs (None: not even `step`)
    gpu_total_gib: float | None  # what the plan needs per GPU at that length
    gpu_capacity_gib: float
    recompute: bool | None       # whether layers are recomputed at that length
    step: int
    # The longest with what the spec lacks of activation offload and MoE tiles switched on, and those
    # settings ("parallelism.activation_offload": True, ...); None / {} when the spec has both.
    with_long_context: int | None = None
    long_context_settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def longest_seq(spec: RunSpec, shape: ModelShape | None = None, *, step: int = 1024, limit: int = MAX_SEQ_LEN) -> LongestSeq:
    """The longest ``data.max_seq_len`` (a multiple of ``step``, at most ``limit``) whose GPU memory plan
    fits, with everything else as the spec says (``activation_checkpointing: auto`` switches on as the
    sequence grows). A planner projection: measured long-context rows are in docs/benchmarks.md.
    ``with_long_context`` is the same search with activation offload and MoE tiles on (docs/long-context.md)."""
    shape = resolve_shape(spec, shape)
    found = _longest(spec, shape, step, limit)
    extra = long_context_settings(spec)
    if extra:
        found.long_context_settings = {k.replace("__", "."): v for k, v in extra.items()}
        found.with_long_context = _longest(_with(spec, **extra), shape, step, limit).tokens
    return found


def _longest(spec: RunSpec, shape: ModelShape, step: int, limit: int) -> LongestSeq:
    def plan_at(n: int) -> MemoryPlan:
        return memory_plan(_with(spec, data__max_seq_len=n * step), shape, suggest=False)

    def fits(n: int) -> bool:
        mp = plan_at(n)
        # Offloaded activations grow the host's share with the length too; otherwise it does not depend on it.
        host_ok = not spec.parallelism.activation_offload or mp.host_total_gib <= mp.host_capacity_gib
        return mp.gpu_total_gib <= mp.gpu_capacity_gib and host_ok

    cap = plan_at(1).gpu_capacity_gib
    if not fits(1):
        return LongestSeq(None, None, cap, None, step)
    # Memory grows with the length whether layers are recomputed or not, so "fits" flips once: bisect.
    lo, hi = 1, limit // step
    if fits(hi):
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    at = _with(spec, data__max_seq_len=lo * step)
    return LongestSeq(lo * step, plan_at(lo).gpu_total_gib, cap, recompute_on(at, shape), step)


def plan_run(
    spec: RunSpec, shape: ModelShape | None = None, *, dataset_tokens: float | None = None,
    gpu_price: float | None = None, mfu: float | None = None,
) -> RunPlan:
    """Everything ``gptoss-cloud plan`` shows. Pure; never raises for a plan that does not fit."""
    shape = resolve_shape(spec, shape)
    return RunPlan(
        memory=memory_plan(spec, shape),
        disk=disk_plan(spec, shape),
        time=time_plan(spec, shape, dataset_tokens=dataset_tokens, gpu_price=gpu_price, mfu=mfu),
        params={"total": shape.total_params, "active": shape.active_params, "trainable": trainable_params(shape, spec)},
    )
