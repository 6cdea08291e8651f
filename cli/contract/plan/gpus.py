"""The GPU catalog: memory, dense bf16 peak and typical host memory per GPU, with the spec's figures winning."""

from __future__ import annotations

from dataclasses import dataclass

from gptoss_cloud.contract.spec import RunSpec


@dataclass(frozen=True)
class Gpu:
    memory_gib: float
    bf16_tflops: float          # dense peak
    host_gib_per_gpu: float     # typical host RAM per GPU of a node of these cards


GPUS: dict[str, Gpu] = {
    "H100": Gpu(80, 989, 225),
    "H200": Gpu(141, 989, 256),
    "GH200": Gpu(96, 989, 480),
    "B200": Gpu(180, 2250, 256),
    "A100": Gpu(80, 312, 140),
    "A100-40GB": Gpu(40, 312, 140),
    "L40S": Gpu(48, 362, 128),
}


def gpu_info(spec: RunSpec) -> Gpu:
    """The card: its catalog entry, with the spec's explicit memory figures winning."""
    c = spec.cluster
    base = GPUS.get(c.gpu_type.upper().replace("_", "-"))
    if base is None:  # unknown card: trust the spec's memory, assume H100-class compute
        return Gpu(c.gpu_memory_gib, 989, 225)
    mem = c.gpu_memory_gib if "gpu_memory_gib" in c.model_fields_set else base.memory_gib
    return Gpu(mem, base.bf16_tflops, base.host_gib_per_gpu)


def host_capacity_gib(spec: RunSpec) -> float:
    c = spec.cluster
    if c.host_memory_gib is not None:
        return c.host_memory_gib
    return gpu_info(spec).host_gib_per_gpu * spec.parallelism.gpus_per_node
