"""What a training pod asks of its node and how the JobSet treats disruptions. Pure, like render/k8s.py.

Resources come from the planner's host figure (``plan._host_components``: weight loading, offloaded
states, async checkpoint staging, per-process overhead), so the scheduler places a pod only where that
fits, and the memory limit is the host budget the planner checks against (capacity x headroom).

Preemption and node shutdown are not the run's fault: the Job's ``podFailurePolicy`` fails the Job
with reason ``PodFailurePolicy`` when a pod carries the ``DisruptionTarget`` condition, and the JobSet
rule restarts on that reason without counting against ``cluster.max_restarts``.
"""

from __future__ import annotations

import math

from gptoss_cloud.contract.errors import SpecError
from gptoss_cloud.contract.spec import RunSpec

CPU_PER_GPU = 8          # dataloader workers, NCCL proxy threads, checkpoint copies per rank
MIN_MEMORY_GIB = 16
DISRUPTION_REASON = "PodFailurePolicy"


def trainer_resources(spec: RunSpec) -> dict[str, dict[str, str]]:
    """requests {cpu, memory} and limits {memory} of one training pod (one node's ranks)."""
    from gptoss_cloud.contract.plan.memory import HOST_HEADROOM, _host_components
    from gptoss_cloud.contract.plan.gpus import host_capacity_gib
    from gptoss_cloud.contract.plan.sizes import resolve_shape

    g = spec.parallelism.gpus_per_node
    budget = host_capacity_gib(spec) * HOST_HEADROOM
    try:
        need = sum(_host_components(resolve_shape(spec), spec).values())
    except SpecError:
        need = budget   # an unknown shape: ask for the whole budget rather than guess low
    request = min(max(MIN_MEMORY_GIB, math.ceil(need)), math.floor(budget))
    return {"requests": {"cpu": str(CPU_PER_GPU * g), "memory": f"{request}Gi"},
            "limits": {"memory": f"{max(request, math.floor(budget))}Gi"}}


def pod_failure_policy() -> dict:
    """Job-level: a disrupted pod (preempted, evicted for node shutdown) fails the Job with a reason
    the JobSet recognises; any other failure takes the ordinary path. Needs restartPolicy Never."""
    return {"rules": [{"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]}


def jobset_failure_policy(spec: RunSpec) -> dict:
    return {
        "maxRestarts": spec.cluster.max_restarts,
        "rules": [{
            "name": "disruption-restarts-free",
            "action": "RestartJobSetAndIgnoreMaxRestarts",
            "onJobFailureReasons": [DISRUPTION_REASON],
        }],
    }
