"""What every object gptoss-cloud renders carries: its label keys and values, and the pod and container
security contexts (restricted Pod Security: non-root, no privilege escalation, all capabilities dropped,
RuntimeDefault seccomp). Training, serving, GitOps and cluster objects all take them from here."""

from __future__ import annotations

from typing import Any

UID = 1000                                 # the images' non-root user (images/*.Dockerfile)
RUN_LABEL = "gptoss-cloud.dev/run-id"      # on every object of a run: `delete RUN` selects on it
NAME_LABEL = "gptoss-cloud.dev/run-name"   # the spec's name
KIND_LABEL = "gptoss-cloud.dev/kind"       # train | serve | merge | schedule | ...
KUEUE_LABEL = "kueue.x-k8s.io/queue-name"  # the Kueue LocalQueue a JobSet is admitted through (cluster.queue)
POD_SECURITY_ANNOTATION = "gptoss-cloud.dev/pod-security"


def _common() -> dict[str, str]:
    return {"app.kubernetes.io/name": "gptoss-cloud", "app.kubernetes.io/managed-by": "gptoss-cloud"}


def run_labels(run_id: str, run_name: str, kind: str = "train") -> dict[str, str]:
    """A training run's objects (JobSet, its pods, the spec ConfigMap)."""
    return {**_common(), RUN_LABEL: run_id, NAME_LABEL: run_name, KIND_LABEL: kind}


def serving_labels(run_id: str, component: str) -> dict[str, str]:
    """A served run's objects (merge Job, Deployment, Service, ...): the run-id label `delete` selects on."""
    return {**_common(), "app.kubernetes.io/component": component, "app.kubernetes.io/instance": run_id,
            RUN_LABEL: run_id, KIND_LABEL: component}


def schedule_labels(run_name: str, component: str) -> dict[str, str]:
    """A recurring run's objects (CronJob and its RBAC): named by the spec, not by a run id (each tick makes one)."""
    return {**_common(), "app.kubernetes.io/component": component, NAME_LABEL: run_name}


def cluster_labels() -> dict[str, str]:
    """What a cluster admin applies once (k8s/): managed by gptoss-cloud, no run."""
    return {**_common(), "app.kubernetes.io/component": "cluster"}


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context(add_capabilities: list[str] | None = None) -> dict[str, Any]:
    caps: dict[str, Any] = {"drop": ["ALL"]}
    if add_capabilities:  # RDMA (cluster.rdma) needs IPC_LOCK: the one relaxation, annotated on the pod
        caps["add"] = list(add_capabilities)
    return {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "capabilities": caps,
            "seccompProfile": {"type": "RuntimeDefault"}}
