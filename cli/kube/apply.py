"""Create-or-update rendered objects with the official kubernetes client, and delete by label.

Thin I/O over the pure renderers. API errors become one line naming the object and what to do
(missing CRD, forbidden verb, invalid field), chained with ``from e``. Jobs are immutable once
created, so an existing Job is left as it is (the merge it runs is idempotent).
"""

from __future__ import annotations

import re
import secrets as _secrets
from dataclasses import dataclass
from typing import Any

from gptoss_cloud.contract.errors import BackendError

JOBSET_GROUP, JOBSET_VERSION, JOBSET_PLURAL = "jobset.x-k8s.io", "v1alpha2", "jobsets"

# kind -> (API class, method suffix)
_TYPED: dict[str, tuple[str, str]] = {
    "ConfigMap": ("CoreV1Api", "config_map"),
    "Secret": ("CoreV1Api", "secret"),
    "Service": ("CoreV1Api", "service"),
    "ServiceAccount": ("CoreV1Api", "service_account"),
    "Deployment": ("AppsV1Api", "deployment"),
    "Job": ("BatchV1Api", "job"),
    "CronJob": ("BatchV1Api", "cron_job"),
    "NetworkPolicy": ("NetworkingV1Api", "network_policy"),
    "Role": ("RbacAuthorizationV1Api", "role"),
    "RoleBinding": ("RbacAuthorizationV1Api", "role_binding"),
}
_PLURAL = {"ConfigMap": "configmaps", "Secret": "secrets", "Service": "services", "ServiceAccount": "serviceaccounts",
           "Deployment": "deployments", "Job": "jobs", "CronJob": "cronjobs", "NetworkPolicy": "networkpolicies",
           "Role": "roles", "RoleBinding": "rolebindings", "JobSet": "jobsets"}


@dataclass
class Kube:
    namespace: str
    context: str | None = None
    _api_client: Any = None

    @property
    def api_client(self):
        if self._api_client is None:
            from gptoss_cloud.kube.client import connect  # kubeconfig / in-cluster configuration, with its error translation

            self._api_client = connect(self.namespace, self.context).core.api_client
        return self._api_client

    def _api(self, cls: str):
        from kubernetes import client

        return getattr(client, cls)(self.api_client)

    # ------------------------------------------------------------------------------------ apply
    def apply(self, obj: dict) -> str:
        """Create ``obj``, or update it in place when it exists; return 'created' | 'updated' | 'unchanged'."""
        from kubernetes.client.exceptions import ApiException

        kind, name = obj["kind"], obj["metadata"]["name"]
        ns = obj["metadata"].get("namespace", self.namespace)
        try:
            try:
                self._create(kind, ns, obj)
                return "created"
            except ApiException as e:
                if e.status != 409:
                    raise
            if kind == "Job":
                return "unchanged"
            self._patch(kind, ns, name, obj)
            return "updated"
        except ApiException as e:
            raise translate_api_error(e, kind, name, ns, "create") from e

    def _create(self, kind: str, ns: str, obj: dict) -> None:
        if kind == "JobSet":
            self._api("CustomObjectsApi").create_namespaced_custom_object(JOBSET_GROUP, JOBSET_VERSION, ns, JOBSET_PLURAL, obj)
            return
        cls, suffix = _typed(kind)
        getattr(self._api(cls), f"create_namespaced_{suffix}")(ns, obj)

    def _patch(self, kind: str, ns: str, name: str, obj: dict) -> None:
        if kind == "JobSet":
            self._api("CustomObjectsApi").patch_namespaced_custom_object(JOBSET_GROUP, JOBSET_VERSION, ns, JOBSET_PLURAL, name, obj)
            return
        cls, suffix = _typed(kind)
        getattr(self._api(cls), f"patch_namespaced_{suffix}")(name, ns, obj)

    # ----------------------------------------------------------------------------------- secrets
    def ensure_api_key_secret(self, name: str, key: str, labels: dict[str, str]) -> bool:
        """Create the API key Secret with a random key when absent; True if created. The value is never printed."""
        from kubernetes.client.exceptions import ApiException

        core = self._api("CoreV1Api")
        try:
            core.read_namespaced_secret(name, self.namespace)
            return False
        except ApiException as e:
            if e.status != 404:
                raise translate_api_error(e, "Secret", name, self.namespace, "get") from e
        body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": name, "namespace": self.namespace, "labels": labels},
                "stringData": {key: _secrets.token_urlsafe(32)}}
        try:
            core.create_namespaced_secret(self.namespace, body)
        except ApiException as e:
            raise translate_api_error(e, "Secret", name, self.namespace, "create") from e
        return True

    # ------------------------------------------------------------------------------------ delete
    def delete_by_label(self, selector: str, kinds: list[str]) -> list[str]:
        """Delete every object of ``kinds`` matching ``selector``; return 'Kind/name' of each deleted one."""
        from kubernetes.client.exceptions import ApiException

        gone = []
        for kind in kinds:
            try:
                for name in self._list_names(kind, selector):
                    self._delete(kind, name)
                    gone.append(f"{kind}/{name}")
            except ApiException as e:
                if e.status == 404 and kind == "JobSet":
                    continue  # no JobSet CRD installed: nothing of that kind to delete
                raise translate_api_error(e, kind, selector, self.namespace, "delete") from e
        return gone

    def _list_names(self, kind: str, selector: str) -> list[str]:
        if kind == "JobSet":
            out = self._api("CustomObjectsApi").list_namespaced_custom_object(
                JOBSET_GROUP, JOBSET_VERSION, self.namespace, JOBSET_PLURAL, label_selector=selector)
            return [o["metadata"]["name"] for o in out.get("items", [])]
        cls, suffix = _typed(kind)
        out = getattr(self._api(cls), f"list_namespaced_{suffix}")(self.namespace, label_selector=selector)
        return [o.metadata.name for o in out.items]

    def _delete(self, kind: str, name: str) -> None:
        if kind == "JobSet":
            self._api("CustomObjectsApi").delete_namespaced_custom_object(
                JOBSET_GROUP, JOBSET_VERSION, self.namespace, JOBSET_PLURAL, name, propagation_policy="Foreground")
            return
        cls, suffix = _typed(kind)
        getattr(self._api(cls), f"delete_namespaced_{suffix}")(name, self.namespace, propagation_policy="Background")


def _typed(kind: str) -> tuple[str, str]:
    if kind not in _TYPED:
        raise BackendError(f"cannot apply objects of kind {kind}")
    return _TYPED[kind]


def translate_api_error(e: Exception, kind: str, name: str, namespace: str, verb: str) -> BackendError:
    status = getattr(e, "status", None)
    reason = getattr(e, "reason", "") or ""
    body = getattr(e, "body", "") or ""
    msg = _message(body) or reason
    what = f"{kind} {name!r} in namespace {namespace!r}"
    if status == 404 and kind == "JobSet":
        return BackendError(f"the JobSet API is not installed in this cluster ({what})",
                            hint="install JobSet: kubectl apply --server-side -f https://github.com/kubernetes-sigs/jobset/releases/download/v0.12.0/manifests.yaml")
    if status == 404:
        return BackendError(f"{what}: not found ({msg})", hint="check --namespace and --context")
    if status == 403:
        return BackendError(f"forbidden: cannot {verb} {_PLURAL.get(kind, kind.lower())} in namespace {namespace!r} ({msg})",
                            hint=f"ask for RBAC allowing '{verb}' on {_PLURAL.get(kind, kind.lower())}, or use another --namespace")
    if status == 401:
        return BackendError(f"unauthorized while trying to {verb} {what}", hint="refresh your kubeconfig credentials")
    if status == 422:
        return BackendError(f"the API server rejected {what}: {msg}")
    return BackendError(f"{verb} {what} failed: HTTP {status} {msg}".rstrip())


def _message(body: str) -> str:
    m = re.search(r'"message"\s*:\s*"((?:[^"\\]|\\.)*)"', body or "")
    return m.group(1) if m else ""
