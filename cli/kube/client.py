"""The one Kubernetes client: configuration, one connection type, and the one translation of API errors.

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
    """One ApiClient bound to one namespace; typed APIs are built over it on demand."""
    api_client: Any  # kubernetes.client.ApiClient
    namespace: str
    host: str

    def api(self, cls: str) -> Any:
        """``kubernetes.client.<cls>`` (CoreV1Api, AppsV1Api, ...) over this connection."""
        from kubernetes import client

        return getattr(client, cls)(self.api_client)

    @property
    def core(self) -> Any:
        return self.api("CoreV1Api")

    @property
    def custom(self) -> Any:
        return self.api("CustomObjectsApi")


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
    return Kube(api_client=api, namespace=namespace, host=api.configuration.host)


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
        if e.status == 404 and "." in resource and not _names_object(e):
            # A missing object answers with a Status naming it; a missing API answers without one.
            if resource.startswith("jobsets."):
                return BackendError(
                    f"the JobSet API ({JOBSET_GROUP}/{JOBSET_VERSION}) is not installed on the cluster at {kube.host}",
                    hint=f"install JobSet {JOBSET_RELEASE}: {JOBSET_INSTALL}",
                )
            return BackendError(f"the {resource} API is not installed on the cluster at {kube.host}",
                                hint="install its operator, or turn off the setting that renders it")
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
