"""Kubernetes client helpers: configuration, the calls the backend makes, and error translation.

Uses the official ``kubernetes`` client (imported lazily: it is slow to import). Configuration comes
from the kubeconfig (``KUBECONFIG`` or ~/.kube/config, ``cluster.context`` picks the context) or,
inside a pod, the in-cluster service account. Every API error becomes one line naming the resource,
the verb and what to do about it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

from gptoss_cloud.contract.errors import BackendError

JOBSET_GROUP = "jobset.x-k8s.io"
JOBSET_VERSION = "v1alpha2"
JOBSET_PLURAL = "jobsets"
JOBSET_RELEASE = "v0.12.0"
JOBSET_INSTALL = (
    f"kubectl apply --server-side -f "
    f"https://github.com/kubernetes-sigs/jobset/releases/download/{JOBSET_RELEASE}/manifests.yaml"
)


@dataclass
class Kube:
    core: Any        # kubernetes.client.CoreV1Api
    custom: Any      # kubernetes.client.CustomObjectsApi
    namespace: str
    host: str


def connect(namespace: str, context: str | None = None) -> Kube:
    """API clients from the kubeconfig (optionally a named context), else the in-cluster config."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        # The client reads KUBECONFIG once at import; read it per call so the variable always counts.
        config_file = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
        api = config.new_client_from_config(config_file=config_file, context=context)
    except (ConfigException, FileNotFoundError, TypeError) as e:
        if context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            try:
                config.load_incluster_config()
                api = client.ApiClient()
            except ConfigException as e2:
                raise BackendError(f"in-cluster Kubernetes configuration failed: {e2}") from e2
        else:
            where = os.environ.get("KUBECONFIG", "~/.kube/config")
            what = f"context {context!r} in {where}" if context else f"a usable kubeconfig ({where})"
            raise BackendError(
                f"no Kubernetes configuration: cannot load {what}: {e}",
                hint="check `kubectl config get-contexts`; set cluster.context / --context or KUBECONFIG",
            ) from e
    return Kube(core=client.CoreV1Api(api), custom=client.CustomObjectsApi(api), namespace=namespace,
                host=api.configuration.host)


# ------------------------------------------------------------------------------------ errors
def _reason(e: Any) -> str:
    try:
        body = json.loads(e.body or "{}")
        return body.get("message") or e.reason or ""
    except (TypeError, ValueError):
        return str(e.body or e.reason or "")


def _names_object(e: Any) -> bool:
    try:
        return bool(json.loads(e.body or "{}").get("details", {}).get("name"))
    except (TypeError, ValueError, AttributeError):
        return False


def translate(e: Exception, *, verb: str, resource: str, name: str | None, kube: Kube) -> BackendError:
    """One clear line for a failed API call: what, where, and what to do."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    target = f"{resource} {name!r}" if name else resource
    where = f"in namespace {kube.namespace!r}"
    if isinstance(e, ApiException):
        msg = _reason(e)
        if e.status == 404 and resource.startswith("jobsets") and not _names_object(e):
            # A missing object answers with a Status naming it; a missing API answers without one.
            return BackendError(
                f"the JobSet API ({JOBSET_GROUP}/{JOBSET_VERSION}) is not installed on the cluster at {kube.host}",
                hint=f"install JobSet {JOBSET_RELEASE}: {JOBSET_INSTALL}",
            )
        if e.status == 404:
            return BackendError(f"{target} not found {where}", hint="list runs with `gptoss-cloud runs`; check --namespace / cluster.namespace")
        if e.status == 403:
            return BackendError(
                f"forbidden: cannot {verb} {resource} {where} ({msg})",
                hint=f"ask a cluster admin for a Role allowing '{verb}' on '{resource}' {where}",
            )
        if e.status == 401:
            return BackendError(f"the API server at {kube.host} rejected the credentials ({msg})",
                                hint="refresh them (e.g. your cloud CLI's get-credentials / kubectl login) and retry")
        if e.status == 409:
            return BackendError(f"{target} already exists {where}", hint="submit again for a new run id, or cancel the old run")
        if e.status == 422:
            return BackendError(f"the API server refused {target}: {msg}")
        return BackendError(f"{verb} {target} {where} failed: HTTP {e.status} {msg}".rstrip())
    if isinstance(e, (HTTPError, OSError)):
        return BackendError(f"cannot reach the Kubernetes API server at {kube.host}: {e.__class__.__name__}",
                            hint="check the network / VPN and `kubectl cluster-info`")
    return BackendError(f"{verb} {target} {where} failed: {e}")


def call(kube: Kube, verb: str, resource: str, name: str | None, fn, *args, **kwargs):
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return fn(*args, **kwargs)
    except (ApiException, HTTPError, OSError) as e:
        raise translate(e, verb=verb, resource=resource, name=name, kube=kube) from e


def is_not_found(e: BaseException) -> bool:
    cause = e.__cause__
    return getattr(cause, "status", None) == 404


# ------------------------------------------------------------------------------------ calls
def create_object(kube: Kube, obj: dict) -> dict:
    kind, name = obj["kind"], obj["metadata"]["name"]
    if kind == "ConfigMap":
        return call(kube, "create", "configmaps", name, kube.core.create_namespaced_config_map, kube.namespace, obj).to_dict()
    if kind == "JobSet":
        return call(kube, "create", "jobsets.jobset.x-k8s.io", name, kube.custom.create_namespaced_custom_object,
                    JOBSET_GROUP, JOBSET_VERSION, kube.namespace, JOBSET_PLURAL, obj)
    raise BackendError(f"cannot create {kind}")  # internal: the renderer only makes these two kinds


def set_owner(kube: Kube, configmap: str, jobset: dict) -> None:
    """Make the spec ConfigMap a dependent of the JobSet, so the JobSet's TTL or deletion removes it."""
    ref = {"apiVersion": jobset["apiVersion"], "kind": "JobSet", "name": jobset["metadata"]["name"],
           "uid": jobset["metadata"]["uid"], "blockOwnerDeletion": False, "controller": False}
    call(kube, "patch", "configmaps", configmap, kube.core.patch_namespaced_config_map, configmap, kube.namespace,
         {"metadata": {"ownerReferences": [ref]}})


def get_jobset(kube: Kube, name: str) -> dict:
    return call(kube, "get", "jobsets.jobset.x-k8s.io", name, kube.custom.get_namespaced_custom_object,
                JOBSET_GROUP, JOBSET_VERSION, kube.namespace, JOBSET_PLURAL, name)


def list_jobsets(kube: Kube, label_selector: str) -> list[dict]:
    out = call(kube, "list", "jobsets.jobset.x-k8s.io", None, kube.custom.list_namespaced_custom_object,
               JOBSET_GROUP, JOBSET_VERSION, kube.namespace, JOBSET_PLURAL, label_selector=label_selector)
    return out.get("items", [])


def delete_jobset(kube: Kube, name: str) -> None:
    call(kube, "delete", "jobsets.jobset.x-k8s.io", name, kube.custom.delete_namespaced_custom_object,
         JOBSET_GROUP, JOBSET_VERSION, kube.namespace, JOBSET_PLURAL, name, propagation_policy="Foreground")


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
