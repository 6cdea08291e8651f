"""RunSpec -> Kubernetes objects for one training run: a spec ConfigMap and a JobSet. Pure; no I/O.

One JobSet per run, one replicated job ``w`` whose Indexed Job runs one pod per node with all its
GPUs. Node rank is the Job completion index; rank 0's pod has the stable DNS name
``<run-id>-w-0-0.<run-id>`` through the JobSet's headless service, and every pod rendezvouses there.
The replicated job's name is one letter so that the longest generated pod name
(``<run-id>-w-0-<index>-<5 random>``) stays within 63 characters for any run id of at most 50.

Pods meet the "restricted" Pod Security profile unless ``cluster.rdma`` asks for a fast
interconnect; what that relaxes is listed in the ``gptoss-cloud.dev/pod-security`` annotation.
Credentials appear only as Secret references.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from gptoss_cloud.contract.credentials import require_plain_env
from gptoss_cloud.contract.hub_files import WEIGHT_INCLUDE
from gptoss_cloud.contract.images import trainer_image
from gptoss_cloud.render.k8s.pod import jobset_failure_policy, pod_failure_policy, trainer_resources
from gptoss_cloud.contract.errors import SpecError
from gptoss_cloud.contract.shapes import HUB_IDS
from gptoss_cloud.contract.spec import RunSpec
from gptoss_cloud.render.k8s.meta import (  # noqa: F401 (the label names are part of this renderer's interface)
    KIND_LABEL, KUEUE_LABEL, NAME_LABEL, POD_SECURITY_ANNOTATION, RUN_LABEL, UID, container_security_context,
    pod_security_context, run_labels,
)

JOBSET_API = "jobset.x-k8s.io/v1alpha2"
REPLICATED_JOB = "w"
SPEC_DIR = "/etc/gptoss"
SPEC_PATH = f"{SPEC_DIR}/spec.yaml"
CACHE_DIR = "/cache"
HF_CACHE = f"{CACHE_DIR}/hf"
MIRROR_DIR = f"{CACHE_DIR}/weights"
SCRATCH_DIR = "/scratch"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


# ------------------------------------------------------------------------------------------ names
def check_name(name: str, what: str, *, dns1035: bool = False, max_len: int = 63) -> str:
    """Refuse a Kubernetes name with the rule that broke."""
    if len(name) > max_len:
        raise SpecError(f"{what} {name!r} is {len(name)} characters; Kubernetes allows at most {max_len}")
    if dns1035 and not _DNS1035_LABEL.match(name):
        raise SpecError(
            f"{what} {name!r} is not a DNS-1035 label: lowercase letters, digits and '-', "
            "starting with a letter and ending with a letter or digit",
            hint="choose a spec `name` that starts with a letter",
        )
    if not _DNS1123_LABEL.match(name):
        raise SpecError(
            f"{what} {name!r} is not a DNS-1123 label: lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return name


def pod_name_prefix(run_id: str, node: int) -> str:
    return f"{run_id}-{REPLICATED_JOB}-0-{node}"


def check_run_names(run_id: str, nodes: int) -> None:
    """The names JobSet derives from a run id: job, pods (+5 random characters), service (DNS-1035)."""
    check_name(run_id, "run id (JobSet name)", dns1035=True)
    check_name(f"{run_id}-{REPLICATED_JOB}-0", "Job name", dns1035=True)
    check_name(pod_name_prefix(run_id, nodes - 1) + "-abcde", "longest pod name", dns1035=True)
    check_name(configmap_name(run_id), "ConfigMap name", max_len=253)


def configmap_name(run_id: str) -> str:
    return f"{run_id}-spec"


def master_addr(run_id: str) -> str:
    """Rank 0's stable DNS name (JobSet headless service; subdomain = JobSet name)."""
    return f"{pod_name_prefix(run_id, 0)}.{run_id}"


def labels(spec: RunSpec, run_id: str, kind: str = "train") -> dict[str, str]:
    return run_labels(run_id, spec.name, kind)


def rdma_settings(spec: RunSpec) -> dict[str, Any]:
    """What a fast interconnect needs beyond "restricted": resources, capabilities, host paths, env."""
    c = spec.cluster
    if c.rdma == "none":
        return {"resources": {}, "capabilities": [], "host_paths": [], "env": {"NCCL_IB_DISABLE": "1"},
                "relaxed": "restricted"}
    if c.rdma == "efa":
        resource = c.rdma_resource or "vpc.amazonaws.com/efa"
        return {
            "resources": {resource: str(c.rdma_devices or 32)},
            "capabilities": ["IPC_LOCK"],  # libfabric pins (mlocks) its registered memory
            "host_paths": [],
            "env": {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1", "NCCL_NET_GDR_LEVEL": "PHB"},
            # Pod Security "baseline" allows only its fixed capability list, which has no IPC_LOCK.
            "relaxed": (f"privileged: the namespace needs pod-security.kubernetes.io/enforce=privileged for "
                        f"capability IPC_LOCK (EFA memory registration); resource {resource}"),
        }
    resource = c.rdma_resource or "rdma/rdma_shared_device_a"
    return {
        "resources": {resource: str(c.rdma_devices or 1)},
        "capabilities": ["IPC_LOCK"],
        "host_paths": [("infiniband", "/dev/infiniband")],
        "env": {"NCCL_IB_DISABLE": "0", "NCCL_NET_GDR_LEVEL": "PHB"},
        "relaxed": (
            f"privileged: the namespace needs pod-security.kubernetes.io/enforce=privileged for "
            f"capability IPC_LOCK (RDMA memory registration), "
            f"hostPath /dev/infiniband (verbs devices); resource {resource}"
        ),
    }


# --------------------------------------------------------------------------------------- secrets
def secret_env(spec: RunSpec) -> tuple[list[dict], list[dict]]:
    """(env, envFrom) referencing Secrets by name only: never a value."""
    c = spec.cluster
    env: list[dict] = []
    env_from: list[dict] = []
    if c.store_secret:
        if c.store_secret.key:
            raise SpecError(
                "cluster.store_secret.key is not used: every key of the Secret becomes an environment variable",
                hint="put AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and optionally AWS_SESSION_TOKEN, "
                "AWS_ENDPOINT_URL) in the Secret and drop `key`",
            )
        env_from.append({"secretRef": {"name": c.store_secret.name}})
    if c.hf_token_secret:
        env.append(_secret_key_env("HF_TOKEN", c.hf_token_secret.name, c.hf_token_secret.key or "token"))
    if c.checkpoint_key_secret:
        env.append(_secret_key_env("GPTOSS_CHECKPOINT_KEY", c.checkpoint_key_secret.name, c.checkpoint_key_secret.key or "key"))
    for var, ref in sorted(c.secret_env.items()):
        env.append(_secret_key_env(var, ref.name, ref.key or var))
    return env, env_from


def _secret_key_env(var: str, secret: str, key: str) -> dict:
    return {"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


# ------------------------------------------------------------------------------------- weights cache
def weights_source(spec: RunSpec) -> tuple[str, str] | None:
    """('hub', repo id) or ('s3', prefix) for pretrained weights fetched per node; None otherwise."""
    if spec.model.init == "random" or spec.model.name == "tiny":
        return None
    if spec.cluster.weights_mirror:
        return ("s3", spec.cluster.weights_mirror)
    name = spec.model.name
    if name.startswith("s3://"):
        return ("s3", name)
    if name in HUB_IDS:
        return ("hub", HUB_IDS[name])
    if name.startswith("hf://"):
        return ("hub", name[len("hf://"):])
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return ("hub", name)
    return None  # a folder already inside the image or a mounted volume


def weights_init_container(spec: RunSpec, image: str, env: list[dict], env_from: list[dict]) -> dict | None:
    src = weights_source(spec)
    if src is None:
        return None
    kind, where = src
    if kind == "hub":
        # Only the HF-format files: the published repos also hold original/ and metal/ copies.
        cmd = ["hf", "download", where, "--cache-dir", HF_CACHE, "--include", *WEIGHT_INCLUDE]
        if spec.model.revision:
            cmd += ["--revision", spec.model.revision]
    else:
        # The package's own copier (same credentials chain as the trainer; every key contained under the
        # folder; a marker file makes a refilled cache volume a no-op).
        cmd = ["python", "-m", "gptoss_cloud.contract.store.fetch", where, MIRROR_DIR]
    return {
        "name": "fetch-weights",
        "image": image,
        "command": cmd,
        "env": [{"name": "HF_HUB_CACHE", "value": HF_CACHE}, {"name": "HOME", "value": "/tmp"}] + env,
        **({"envFrom": env_from} if env_from else {}),
        "volumeMounts": [{"name": "cache", "mountPath": CACHE_DIR}, {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": container_security_context(),
        "resources": {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "16Gi"}},
    }


def cache_volume(spec: RunSpec, size_gib: float) -> dict:
    size = f"{max(1, int(size_gib + 0.999))}Gi"
    if spec.cluster.cache_storage_class:
        return {"name": "cache", "ephemeral": {"volumeClaimTemplate": {
            "metadata": {"labels": {"app.kubernetes.io/name": "gptoss-cloud"}},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": spec.cluster.cache_storage_class,
                     "resources": {"requests": {"storage": size}}},
        }}}
    return {"name": "cache", "emptyDir": {"sizeLimit": size}}


def pod_spec_copy(spec: RunSpec) -> RunSpec:
    """The spec as the pods read it: an S3 mirror of the weights becomes the node-local folder."""
    src = weights_source(spec)
    if src and src[0] == "s3":
        data = spec.model_dump(mode="json")
        data["model"]["name"] = MIRROR_DIR
        data["cluster"]["weights_mirror"] = src[1]
        return RunSpec.model_validate(data)
    return spec


# --------------------------------------------------------------------------------------- objects
def spec_configmap(spec: RunSpec, run_id: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": configmap_name(run_id), "namespace": spec.cluster.namespace, "labels": labels(spec, run_id)},
        "data": {"spec.yaml": pod_spec_copy(spec).to_yaml()},
    }


def _resources(spec: RunSpec, devices: dict[str, str]) -> dict:
    host = trainer_resources(spec)
    return {"requests": {**devices, **host["requests"]}, "limits": {**devices, **host["limits"]}}


def trainer_container(spec: RunSpec, run_id: str, image: str, env: list[dict], env_from: list[dict], rdma: dict) -> dict:
    p = spec.parallelism
    topology = [
        {"name": "NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}},
        {"name": "NNODES", "value": str(p.nodes)},
        {"name": "NPROC", "value": str(p.gpus_per_node)},
        {"name": "MASTER_ADDR", "value": master_addr(run_id)},
        {"name": "MASTER_PORT", "value": str(spec.cluster.rendezvous_port)},
        {"name": "HF_HUB_CACHE", "value": HF_CACHE},
        {"name": "HOME", "value": "/tmp"},
        {"name": "NCCL_DEBUG", "value": "WARN"},
        {"name": "TORCH_NCCL_ASYNC_ERROR_HANDLING", "value": "1"},
    ]
    topology += [{"name": k, "value": v} for k, v in rdma["env"].items()]
    require_plain_env(spec.cluster)  # cluster.env is written as plain values
    topology += [{"name": k, "value": v} for k, v in sorted(spec.cluster.env.items())]
    limits = {"nvidia.com/gpu": str(p.gpus_per_node), **rdma["resources"]}
    mounts = [
        {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "cache", "mountPath": CACHE_DIR},
        {"name": "scratch", "mountPath": SCRATCH_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ] + [{"name": n, "mountPath": path} for n, path in rdma["host_paths"]]
    return {
        "name": "trainer",
        "image": image,
        "command": [
            "torchrun", "--nnodes=$(NNODES)", "--nproc-per-node=$(NPROC)", "--node-rank=$(NODE_RANK)",
            "--master-addr=$(MASTER_ADDR)", "--master-port=$(MASTER_PORT)", "--no-python",
            "gptoss-cloud", "train", SPEC_PATH, "--run-id", run_id,
        ],
        "env": topology + env,
        **({"envFrom": env_from} if env_from else {}),
        "ports": [{"name": "rendezvous", "containerPort": spec.cluster.rendezvous_port}],
        "resources": _resources(spec, limits),
        "volumeMounts": mounts,
        "securityContext": container_security_context(rdma["capabilities"]),
    }


def pod_template(spec: RunSpec, run_id: str, *, cache_gib: float = 100.0) -> dict:
    c = spec.cluster
    image = trainer_image(spec)
    env, env_from = secret_env(spec)
    rdma = rdma_settings(spec)
    volumes = [
        {"name": "spec", "configMap": {"name": configmap_name(run_id), "items": [{"key": "spec.yaml", "path": "spec.yaml"}]}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{c.shm_gib}Gi"}},
        cache_volume(spec, cache_gib),
        {"name": "scratch", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ] + [{"name": n, "hostPath": {"path": path, "type": "Directory"}} for n, path in rdma["host_paths"]]
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}] + list(c.tolerations)
    pod: dict[str, Any] = {
        "restartPolicy": "Never",  # a failed rank fails the Job; JobSet restarts every rank together
        "automountServiceAccountToken": False,  # the trainer never talks to Kubernetes
        "securityContext": pod_security_context(),
        "containers": [trainer_container(spec, run_id, image, env, env_from, rdma)],
        "volumes": volumes,
        "tolerations": tolerations,
        "terminationGracePeriodSeconds": 120,  # time to finish an in-flight checkpoint upload
    }
    init = weights_init_container(spec, image, env, env_from)
    if init:
        pod["initContainers"] = [init]
    if c.node_selector:
        pod["nodeSelector"] = dict(c.node_selector)
    if c.affinity:
        pod["affinity"] = c.affinity
    if c.priority_class:
        pod["priorityClassName"] = c.priority_class
    if c.service_account:
        pod["serviceAccountName"] = c.service_account  # e.g. IRSA / workload identity for the store
    return {
        "metadata": {"labels": labels(spec, run_id), "annotations": {POD_SECURITY_ANNOTATION: rdma["relaxed"]}},
        "spec": pod,
    }


def jobset(spec: RunSpec, run_id: str, *, cache_gib: float = 100.0) -> dict:
    nodes = spec.parallelism.nodes
    check_run_names(run_id, nodes)
    c = spec.cluster
    meta_labels = labels(spec, run_id)
    if c.queue:
        meta_labels[KUEUE_LABEL] = check_name(c.queue, "cluster.queue")
    js_spec: dict[str, Any] = {
        "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
        "failurePolicy": jobset_failure_policy(spec),
        "replicatedJobs": [{
            "name": REPLICATED_JOB,
            "replicas": 1,
            "template": {
                "metadata": {"labels": labels(spec, run_id)},
                "spec": {
                    "parallelism": nodes,
                    "completions": nodes,
                    "completionMode": "Indexed",
                    "backoffLimit": 0,
                    "podFailurePolicy": pod_failure_policy(),
                    "template": pod_template(spec, run_id, cache_gib=cache_gib),
                },
            },
        }],
    }
    if c.ttl_seconds_after_finished is not None:
        js_spec["ttlSecondsAfterFinished"] = c.ttl_seconds_after_finished
    return {
        "apiVersion": JOBSET_API,
        "kind": "JobSet",
        "metadata": {
            "name": run_id, "namespace": c.namespace, "labels": meta_labels,
            "annotations": {POD_SECURITY_ANNOTATION: rdma_settings(spec)["relaxed"],
                            "gptoss-cloud.dev/master-addr": master_addr(run_id)},
        },
        "spec": js_spec,
    }


def render_run(spec: RunSpec, run_id: str, *, cache_gib: float | None = None) -> list[dict]:
    """Every object a training run applies, in apply order: the spec ConfigMap, then the JobSet.

    ``cache_gib`` sizes the per-node weights cache (default: the planner's base-weights size + 20%).
    """
    check_name(spec.cluster.namespace, "cluster.namespace")
    if cache_gib is None:
        from gptoss_cloud.contract.plan.disk import base_weights_bytes
        from gptoss_cloud.contract.plan.sizes import GiB, resolve_shape

        try:
            cache_gib = base_weights_bytes(resolve_shape(spec), spec) * 1.2 / GiB + 1
        except SpecError:
            cache_gib = 300.0  # an unknown shape: room for a 120b-class checkpoint
    return [spec_configmap(spec, run_id), jobset(spec, run_id, cache_gib=cache_gib)]


def to_yaml(objects: list[dict]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False)
