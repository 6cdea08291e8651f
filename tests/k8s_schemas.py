"""Offline validation of rendered Kubernetes objects (shared by the k8s and serve tests).

Built-in kinds: kubernetes-validate's Kubernetes 1.33 schemas, strict (unknown fields are errors).
JobSet: the v0.12.0 CRD's v1alpha2 openAPIV3Schema through jsonschema, made strict the way the
API server prunes: every object schema without ``properties``-free escape hatches
(``x-kubernetes-preserve-unknown-fields``, ``additionalProperties``) gets ``additionalProperties: false``,
and ``x-kubernetes-int-or-string`` becomes ``integer | string``. Plus the JobSet webhook's rules the
schema cannot express (generated names are DNS-1035 labels within 63 characters, Indexed mode).
"""

from __future__ import annotations

import copy
import functools
import re

import jsonschema
import kubernetes_validate
import yaml

from support import shared_path

K8S_VERSION = "1.33.0"
JOBSET_CRD = ("k8s", "jobset.x-k8s.io_jobsets.v0.12.0.yaml")
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _strict(node):
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if node.pop("x-kubernetes-int-or-string", False):
            node.pop("type", None)
            node.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
        if node.get("type") == "object" and "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("additionalProperties", False)
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@functools.lru_cache(maxsize=1)
def jobset_schema() -> dict:
    crd = yaml.safe_load(shared_path(*JOBSET_CRD).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha2")
    schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    # metadata is the API server's ObjectMeta, not described by the CRD.
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def validate_jobset(obj: dict) -> None:
    jsonschema.validate(obj, jobset_schema(), cls=jsonschema.Draft7Validator)
    # The ObjectMeta and the pod template: validate them as the built-in kinds they are.
    kubernetes_validate.validate(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}, K8S_VERSION, strict=True
    )
    for rjob in obj["spec"]["replicatedJobs"]:
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x", **rjob["template"].get("metadata", {})},
               "spec": rjob["template"]["spec"]}
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    check_jobset_webhook_rules(obj)


def check_jobset_webhook_rules(obj: dict) -> None:
    """What the JobSet v0.12 webhook enforces beyond the schema."""
    name = obj["metadata"]["name"]
    assert _DNS1035.match(name) and len(name) <= 63, name
    for rjob in obj["spec"]["replicatedJobs"]:
        spec = rjob["template"]["spec"]
        assert spec["completionMode"] == "Indexed"
        assert spec["parallelism"] == spec["completions"]
        job_name = f"{name}-{rjob['name']}-{rjob['replicas'] - 1}"
        assert _DNS1035.match(job_name) and len(job_name) <= 63, job_name
        pod_name = f"{job_name}-{spec['completions'] - 1}-abcde"
        assert _DNS1035.match(pod_name) and len(pod_name) <= 63, pod_name


def validate_object(obj: dict) -> None:
    if obj["kind"] == "JobSet":
        validate_jobset(obj)
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
