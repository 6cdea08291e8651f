"""Every call the CLI makes to a cluster, over :class:`client.Kube`, each failure translated by ``client.call``.

Rendered objects are created or updated in place (``apply``) and deleted by label; the training backend's own
calls (JobSet, spec ConfigMap, pods and their logs) sit beside them. Jobs are immutable once created, so an
existing Job is left as it is (the merge it runs is idempotent).
"""

from __future__ import annotations

import secrets as _secrets
from typing import Any, Iterator

from gptoss_cloud.contract.errors import BackendError
from gptoss_cloud.kube.client import JOBSET_GROUP, JOBSET_PLURAL, JOBSET_VERSION, Kube, call, is_not_found

# kind -> (API class, method suffix, plural for messages and RBAC)
TYPED: dict[str, tuple[str, str, str]] = {
    "ConfigMap": ("CoreV1Api", "config_map", "configmaps"),
    "Secret": ("CoreV1Api", "secret", "secrets"),
    "Service": ("CoreV1Api", "service", "services"),
    "ServiceAccount": ("CoreV1Api", "service_account", "serviceaccounts"),
    "Deployment": ("AppsV1Api", "deployment", "deployments"),
    "Job": ("BatchV1Api", "job", "jobs"),
    "CronJob": ("BatchV1Api", "cron_job", "cronjobs"),
    "NetworkPolicy": ("NetworkingV1Api", "network_policy", "networkpolicies"),
    "PodDisruptionBudget": ("PolicyV1Api", "pod_disruption_budget", "poddisruptionbudgets"),
    "Role": ("RbacAuthorizationV1Api", "role", "roles"),
    "RoleBinding": ("RbacAuthorizationV1Api", "role_binding", "rolebindings"),
}
# kind -> (group, version, plural) of the custom resources gptoss-cloud renders
CUSTOM: dict[str, tuple[str, str, str]] = {
    "JobSet": (JOBSET_GROUP, JOBSET_VERSION, JOBSET_PLURAL),
    "PodMonitor": ("monitoring.coreos.com", "v1", "podmonitors"),
}


def resource(kind: str) -> str:
    """How RBAC and error messages name ``kind``: ``configmaps``, ``jobsets.jobset.x-k8s.io``."""
    if kind in CUSTOM:
        group, _, plural = CUSTOM[kind]
        return f"{plural}.{group}"
    if kind in TYPED:
        return TYPED[kind][2]
    raise BackendError(f"cannot apply objects of kind {kind}")


def _typed(kube: Kube, kind: str, verb: str) -> Any:
    cls, suffix, _ = TYPED[kind]
    return getattr(kube.api(cls), f"{verb}_namespaced_{suffix}")


# ---------------------------------------------------------------------------------------- apply
def create(kube: Kube, obj: dict) -> Any:
    kind, name = obj["kind"], obj["metadata"]["name"]
    ns = obj["metadata"].get("namespace", kube.namespace)
    if kind in CUSTOM:
        return call(kube, "create", resource(kind), name, kube.custom.create_namespaced_custom_object, *CUSTOM[kind][:2], ns,
                    CUSTOM[kind][2], obj)
    return call(kube, "create", resource(kind), name, _typed(kube, kind, "create"), ns, obj)


def patch(kube: Kube, obj: dict) -> Any:
    kind, name = obj["kind"], obj["metadata"]["name"]
    ns = obj["metadata"].get("namespace", kube.namespace)
    if kind in CUSTOM:
        return call(kube, "patch", resource(kind), name, kube.custom.patch_namespaced_custom_object, *CUSTOM[kind][:2], ns,
                    CUSTOM[kind][2], name, obj)
    return call(kube, "patch", resource(kind), name, _typed(kube, kind, "patch"), name, ns, obj)


def apply(kube: Kube, obj: dict) -> str:
    """Create ``obj``, or update it in place when it exists; return 'created' | 'updated' | 'unchanged'."""
    resource(obj["kind"])  # an unknown kind fails before any call
    try:
        create(kube, obj)
        return "created"
    except BackendError as e:
        if getattr(e.__cause__, "status", None) != 409:
            raise
    if obj["kind"] == "Job":
        return "unchanged"
    patch(kube, obj)
    return "updated"


def ensure_api_key_secret(kube: Kube, name: str, key: str, labels: dict[str, str]) -> bool:
    """Create the API key Secret with a random key when absent; True if created. The value is never printed."""
    try:
        call(kube, "get", "secrets", name, kube.core.read_namespaced_secret, name, kube.namespace)
        return False
    except BackendError as e:
        if not is_not_found(e):
            raise
    body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": kube.namespace, "labels": labels},
            "stringData": {key: _secrets.token_urlsafe(32)}}
    call(kube, "create", "secrets", name, kube.core.create_namespaced_secret, kube.namespace, body)
    return True


def annotate_pod_template(kube: Kube, deployment: str, annotations: dict[str, str], field_manager: str) -> bool:
    """Roll a Deployment the way ``kubectl rollout restart`` does: patch its pod template's annotations. Its own
    field manager, because Flux takes over fields of the "kubectl" managers when it applies. False: no such Deployment."""
    body = {"spec": {"template": {"metadata": {"annotations": annotations}}}}
    try:
        call(kube, "patch", "deployments", deployment, kube.api("AppsV1Api").patch_namespaced_deployment,
             deployment, kube.namespace, body, field_manager=field_manager)
    except BackendError as e:
        if is_not_found(e):
            return False
        raise
    return True


# --------------------------------------------------------------------------------------- delete
def delete_by_label(kube: Kube, selector: str, kinds: list[str]) -> list[str]:
    """Delete every object of ``kinds`` matching ``selector``; return 'Kind/name' of each deleted one. A custom
    resource whose API the cluster does not serve (no JobSet or Prometheus operator installed) has nothing to delete."""
    gone = []
    for kind in kinds:
        try:
            names = _list_names(kube, kind, selector)
        except BackendError as e:
            if kind in CUSTOM and is_not_found(e):
                continue
            raise
        for name in names:
            _delete(kube, kind, name)
            gone.append(f"{kind}/{name}")
    return gone


def _list_names(kube: Kube, kind: str, selector: str) -> list[str]:
    if kind in CUSTOM:
        out = call(kube, "list", resource(kind), None, kube.custom.list_namespaced_custom_object, *CUSTOM[kind][:2],
                   kube.namespace, CUSTOM[kind][2], label_selector=selector)
        return [o["metadata"]["name"] for o in out.get("items", [])]
    out = call(kube, "list", resource(kind), None, _typed(kube, kind, "list"), kube.namespace, label_selector=selector)
    return [o.metadata.name for o in out.items]


def _delete(kube: Kube, kind: str, name: str) -> None:
    if kind in CUSTOM:
        call(kube, "delete", resource(kind), name, kube.custom.delete_namespaced_custom_object, *CUSTOM[kind][:2],
             kube.namespace, CUSTOM[kind][2], name, propagation_policy="Foreground")
        return
    call(kube, "delete", resource(kind), name, _typed(kube, kind, "delete"), name, kube.namespace,
         propagation_policy="Background")


# ------------------------------------------------------------------------------ training backend
def create_object(kube: Kube, obj: dict) -> dict:
    """Create the spec ConfigMap or the JobSet of a run (a conflict is an error: run ids are fresh)."""
    out = create(kube, obj)
    return out.to_dict() if hasattr(out, "to_dict") else out


def set_owner(kube: Kube, configmap: str, jobset: dict) -> None:
    """Make the spec ConfigMap a dependent of the JobSet, so the JobSet's TTL or deletion removes it."""
    ref = {"apiVersion": jobset["apiVersion"], "kind": "JobSet", "name": jobset["metadata"]["name"],
           "uid": jobset["metadata"]["uid"], "blockOwnerDeletion": False, "controller": False}
    call(kube, "patch", "configmaps", configmap, kube.core.patch_namespaced_config_map, configmap, kube.namespace,
         {"metadata": {"ownerReferences": [ref]}})


def get_jobset(kube: Kube, name: str) -> dict:
    return call(kube, "get", resource("JobSet"), name, kube.custom.get_namespaced_custom_object,
                JOBSET_GROUP, JOBSET_VERSION, kube.namespace, JOBSET_PLURAL, name)


def list_jobsets(kube: Kube, label_selector: str) -> list[dict]:
    out = call(kube, "list", resource("JobSet"), None, kube.custom.list_namespaced_custom_object,
               JOBSET_GROUP, JOBSET_VERSION, kube.namespace, JOBSET_PLURAL, label_selector=label_selector)
    return out.get("items", [])


def delete_jobset(kube: Kube, name: str) -> None:
    _delete(kube, "JobSet", name)


def delete_configmap(kube: Kube, name: str) -> None:
    call(kube, "delete", "configmaps", name, kube.core.delete_namespaced_config_map, name, kube.namespace)


def list_pods(kube: Kube, label_selector: str) -> list[Any]:
    return call(kube, "list", "pods", None, kube.core.list_namespaced_pod, kube.namespace, label_selector=label_selector).items


def pod_log_lines(kube: Kube, pod: str, container: str, *, follow: bool, tail: int | None = None) -> Iterator[str]:
    resp = call(kube, "get", "pods/log", pod, kube.core.read_namespaced_pod_log, pod, kube.namespace,
                container=container, follow=follow, tail_lines=tail, _preload_content=False)
    buf = b""
    try:
        for chunk in resp.stream(4096):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                yield line.decode("utf-8", "replace")
        if buf:
            yield buf.decode("utf-8", "replace")
    finally:
        resp.release_conn()
