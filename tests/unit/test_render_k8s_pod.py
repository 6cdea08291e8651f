"""Training pods: host resources from the planner, disruption restarts that keep maxRestarts, the RDMA
annotation naming the Pod Security profile the namespace needs."""

from __future__ import annotations

import pytest

from gptoss_cloud.contract.plan.memory import HOST_HEADROOM, _host_components
from gptoss_cloud.contract.plan.gpus import host_capacity_gib
from gptoss_cloud.contract.plan.sizes import resolve_shape
from gptoss_cloud.render.k8s import jobset as rk
from gptoss_cloud.contract.spec import RunSpec
from k8s_schemas import validate_jobset

RUN = "ft-20250101-120000-abcd"
# Pod Security Standards "baseline": the only capabilities it lets a container add.
BASELINE_CAPS = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
                 "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}


def spec(**cluster) -> RunSpec:
    return RunSpec.model_validate({"name": "ft", "model": {"name": "120b"}, "parallelism": {"nodes": 2, "gpus_per_node": 8},
                                   "cluster": {"backend": "k8s", "namespace": "ml", **cluster}})


def gib(q: str) -> int:
    assert q.endswith("Gi"), q
    return int(q[:-2])


def test_cpu_and_memory_come_from_the_planners_host_figure():
    s = spec()
    js = rk.jobset(s, RUN)
    validate_jobset(js)
    res = js["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    need = sum(_host_components(resolve_shape(s), s).values())
    budget = host_capacity_gib(s) * HOST_HEADROOM
    assert need <= gib(res["requests"]["memory"]) < need + 17
    assert gib(res["limits"]["memory"]) == int(budget)
    assert res["requests"]["cpu"] == "64" and res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == "8"
    small = spec(host_memory_gib=200)
    res = rk.jobset(small, RUN)["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert gib(res["limits"]["memory"]) == int(200 * HOST_HEADROOM)   # the user's host figure wins


def test_disruptions_restart_without_using_up_max_restarts():
    js = rk.jobset(spec(max_restarts=3), RUN)
    validate_jobset(js)
    fp = js["spec"]["failurePolicy"]
    assert fp["maxRestarts"] == 3
    (rule,) = fp["rules"]
    assert rule["action"] == "RestartJobSetAndIgnoreMaxRestarts" and rule["onJobFailureReasons"] == ["PodFailurePolicy"]
    job = js["spec"]["replicatedJobs"][0]["template"]["spec"]
    (pfp,) = job["podFailurePolicy"]["rules"]
    # The Job fails with reason PodFailurePolicy exactly when a pod carries DisruptionTarget (preemption,
    # eviction for node shutdown); podFailurePolicy needs restartPolicy Never.
    assert pfp == {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert job["template"]["spec"]["restartPolicy"] == "Never"


@pytest.mark.parametrize("rdma", ["efa", "infiniband"])
def test_rdma_annotation_names_the_profile_that_admits_it(rdma):
    js = rk.jobset(spec(rdma=rdma), RUN)
    added = set(js["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]
                ["securityContext"]["capabilities"]["add"])
    note = js["metadata"]["annotations"][rk.POD_SECURITY_ANNOTATION]
    assert not added <= BASELINE_CAPS          # IPC_LOCK is outside baseline ...
    assert note.startswith("privileged:") and "enforce=privileged" in note   # ... so the note says privileged
