"""Pure builders for serving a run on Kubernetes: merge Job, vLLM Deployment, Service, NetworkPolicy.

No I/O: ``ServeTarget`` carries what the command learned from the store (does ``merged/`` exist,
which TP). Secrets appear only as references (``secretKeyRef`` / ``envFrom``), never as values.
Pods meet the Pod Security "restricted" profile: non-root, no privilege escalation, all capabilities
dropped, RuntimeDefault seccomp, only emptyDir volumes.

Names (run ids are at most 50 characters, so every name stays within 63, and a Service name must
start with a letter, which a run id need not):

    merge-<run-id>        Job (trainer image): gptoss-cloud merge <home> --out <home>/<merged>
    vllm-<run-id>         Deployment, Service, NetworkPolicy
    vllm-<run-id>-api-key Secret (key ``api-key``) unless serve.api_key_secret names another
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gptoss_cloud.contract import prompt_rule
from gptoss_cloud.contract.images import MIDDLEWARE_DIR, VOCAB_DIR, serve_image, trainer_image
from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.contract.integrity import KEY_ENV
from gptoss_cloud.contract.outputs import spec_says_signed
from gptoss_cloud.contract.plan.serving import weight_bytes
from gptoss_cloud.contract.runs import merged_key as merged_folder
from gptoss_cloud.contract.shapes import HUB_IDS, ModelShape
from gptoss_cloud.contract.spec import RunSpec
from gptoss_cloud.contract.store.objects import join
from gptoss_cloud.render import vllm as vv
from gptoss_cloud.render.vllm import lora_rank  # noqa: F401  (imported from here by the Truss renderer and tests)
from gptoss_cloud.render.k8s.meta import (  # noqa: F401 (gitops builds its pods with the same contexts)
    KIND_LABEL, RUN_LABEL, container_security_context, pod_security_context, serving_labels,
)

from gptoss_cloud.contract.merged import MERGED_MARKER  # noqa: F401 (the merge writes it after every shard)
ADAPTER_MARKER = "adapter_config.json"
MODELS_DIR = "/models"
CACHE_DIR = "/cache"


@dataclass(frozen=True)
class ServeTarget:
    """Everything the builders need, decided by the command before rendering."""

    run_id: str
    home: str                  # store URI of the run home
    spec: RunSpec              # the run's spec, serve/cluster flags applied
    shape: ModelShape
    tp: int
    needs_merge: bool          # render the merge Job (merged folder not yet published)
    step: int | None = None    # serve a given checkpoint step instead of the final merge
    fmt: str = "bf16"          # the merged folder's format: merged/ (bf16) or merged-mxfp4/ (contract/merged.py)
    # serve --promoted NAME: run_id is NAME (the Deployment vllm-NAME, the served model NAME), and the
    # init container reads <store>/promoted/NAME.json at start to find the run (serve_fetch --promoted)
    promoted_store: str | None = None

    @property
    def adapter(self) -> bool:
        return self.spec.serve.adapter

    @property
    def merged_key(self) -> str:
        return merged_folder(self.fmt, self.step)

    @property
    def namespace(self) -> str:
        return self.spec.cluster.namespace

    @property
    def port(self) -> int:
        return self.spec.serve.port


# ------------------------------------------------------------------------------------------ names
def deployment_name(run_id: str) -> str:
    return f"vllm-{run_id}"


def merge_job_name(run_id: str) -> str:
    return f"merge-{run_id}"


def api_key_ref(spec: RunSpec, run_id: str) -> tuple[str, str]:
    ref = spec.serve.api_key_secret
    if ref is not None:
        return ref.name, ref.key or "api-key"
    return f"{deployment_name(run_id)}-api-key", "api-key"


def labels(run_id: str, component: str) -> dict[str, str]:
    return serving_labels(run_id, component)


def selector(run_id: str) -> dict[str, str]:
    return {KIND_LABEL: "serve", RUN_LABEL: run_id}


def _meta(name: str, t: ServeTarget, component: str) -> dict:
    return {"name": name, "namespace": t.namespace, "labels": labels(t.run_id, component)}


def _placement(spec: RunSpec, gpu: bool) -> dict:
    c = spec.cluster
    out: dict = {}
    if c.node_selector:
        out["nodeSelector"] = dict(sorted(c.node_selector.items()))
    tolerations = list(c.tolerations) or ([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}] if gpu else [])
    if tolerations:
        out["tolerations"] = tolerations
    if c.priority_class:
        out["priorityClassName"] = c.priority_class
    if c.service_account:
        out["serviceAccountName"] = c.service_account
    return out


def store_env(spec: RunSpec) -> tuple[list[dict], list[dict]]:
    """(env, envFrom) giving a pod the store: non-secret cluster.env plus the store Secret by reference."""
    env = [{"name": k, "value": v} for k, v in sorted(spec.cluster.env.items())]
    env_from = [{"secretRef": {"name": spec.cluster.store_secret.name}}] if spec.cluster.store_secret else []
    return env, env_from


def hf_token_env(spec: RunSpec) -> list[dict]:
    ref = spec.cluster.hf_token_secret
    if ref is None:
        return []
    return [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key or "token"}}}]


def checkpoint_key_env(spec: RunSpec) -> list[dict]:
    """The signing key, by reference, for every pod that reads or writes the run's signed outputs."""
    ref = spec.cluster.checkpoint_key_secret
    if ref is None:
        return []
    return [{"name": KEY_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key or "key"}}}]


# ------------------------------------------------------------------------------------- merge Job
def merge_command(t: ServeTarget) -> list[str]:
    src = t.home if t.step is None else join(t.home, "checkpoints", f"step-{t.step}")
    return ["gptoss-cloud", "merge", src, "--out", join(t.home, t.merged_key), "--format", t.fmt]


def merge_job(t: ServeTarget) -> dict:
    env, env_from = store_env(t.spec)
    container = {
        "name": "merge",
        "image": trainer_image(t.spec),
        "command": merge_command(t),
        "env": env + hf_token_env(t.spec) + checkpoint_key_env(t.spec) + [{"name": "HOME", "value": CACHE_DIR}],
        "resources": {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"memory": "64Gi"}},
        "securityContext": container_security_context(),
        "volumeMounts": [{"name": "scratch", "mountPath": CACHE_DIR}, {"name": "tmp", "mountPath": "/tmp"}],
    }
    if env_from:
        container["envFrom"] = env_from
    pod = {
        "restartPolicy": "Never",
        "securityContext": pod_security_context(),
        "containers": [container],
        # The merge streams tensor by tensor; scratch holds base weights for a LoRA merge.
        "volumes": [
            {"name": "scratch", "emptyDir": {"sizeLimit": f"{_gib(t.shape, 'bf16') + 16}Gi"}},
            {"name": "tmp", "emptyDir": {}},
        ],
        **_placement(t.spec, gpu=False),
    }
    job_spec: dict = {"backoffLimit": 2, "template": {"metadata": {"labels": labels(t.run_id, "merge")}, "spec": pod}}
    if t.spec.cluster.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = t.spec.cluster.ttl_seconds_after_finished
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(merge_job_name(t.run_id), t, "merge"), "spec": job_spec}


# ------------------------------------------------------------------------------ vLLM Deployment
def _gib(shape: ModelShape, fmt: str) -> int:
    return math.ceil(weight_bytes(shape, fmt) / 1024**3)


def startup_budget_s(shape: ModelShape, tp: int, fmt: str = "bf16") -> int:
    """~10 min of kernel warm-up and CUDA graph capture plus ~5 s per GiB each GPU loads from the volume."""
    return 600 + 5 * math.ceil(_gib(shape, fmt) / tp)


def base_model_ref(spec: RunSpec) -> str:
    """What vLLM loads as the base in --adapter mode: a hub id, or an s3:// mirror fetched into the pod."""
    name = spec.model.name
    if name in HUB_IDS:
        return HUB_IDS[name]
    if name.startswith("s3://") or ("/" in name and not name.startswith((".", "/")) and "://" not in name):
        return name
    raise GptossError(
        f"--adapter needs published base weights, but model.name is {name!r}",
        hint="serve the merged folder instead (drop --adapter), or set model.name to a hub id or an s3:// mirror",
    )


def vllm_args(t: ServeTarget, *, host: str = "0.0.0.0", model: str | None = None, adapter: str | None = None,
              api_key: bool | None = None) -> list[str]:
    """The server flags for this target; ``model``/``adapter`` replace the pod's /models paths (local)."""
    if t.adapter:
        base = base_model_ref(t.spec)
        default, served = (f"{MODELS_DIR}/base" if base.startswith("s3://") else base), f"{t.run_id}-base"
        lora = (t.run_id, adapter or f"{MODELS_DIR}/adapter")
    else:
        default, served, lora = f"{MODELS_DIR}/merged", t.run_id, None
    return vv.server_args(t.spec, t.shape, model=model or default, served_name=served, tp=t.tp, host=host,
                          port=t.port, adapter=lora, api_key=t.spec.serve.api_key if api_key is None else api_key)


def _fetch_container(t: ServeTarget, name: str, src_key: str, marker: str | None, dest: str) -> dict:
    env, env_from = store_env(t.spec)
    run_output = "://" not in src_key  # a folder of the run home (verified), not a base-weights mirror
    cmd = ["python", "-m", "gptoss_cloud.trainer.programs.serve_fetch", join(t.home, src_key) if run_output else src_key, dest]
    if t.promoted_store is not None:   # the run is chosen when the pod starts, not when this is rendered
        cmd = cmd[:3] + [t.promoted_store, dest, "--promoted", t.run_id, "--format", t.fmt]
        marker = None                  # a promoted run's merged/ is published: promotion checks it
    if marker:
        cmd += ["--wait-for", marker]
    if not run_output:
        cmd += ["--no-manifest"]
    elif spec_says_signed(t.spec):
        cmd += ["--signed"]
    c = {
        "name": name,
        "image": trainer_image(t.spec),
        "command": cmd,
        "env": env + (checkpoint_key_env(t.spec) if run_output else []) + [{"name": "HOME", "value": CACHE_DIR}],
        "resources": {"requests": {"cpu": "4", "memory": "8Gi"}, "limits": {"memory": "8Gi"}},
        "securityContext": container_security_context(),
        "volumeMounts": [{"name": "models", "mountPath": MODELS_DIR}, {"name": "cache", "mountPath": CACHE_DIR}],
    }
    if env_from:
        c["envFrom"] = env_from
    return c


def _probe(port_name: str, period: int, failures: int, timeout: int = 5) -> dict:
    return {"httpGet": {"path": "/health", "port": port_name}, "periodSeconds": period,
            "failureThreshold": failures, "timeoutSeconds": timeout}


METRICS_PATH = "/metrics"   # vLLM's Prometheus endpoint, left open by gptoss_serve_auth


def scrape_annotations(t: ServeTarget) -> dict[str, str]:
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(t.port), "prometheus.io/path": METRICS_PATH}


def deployment(t: ServeTarget) -> dict:
    s = t.spec.serve
    init = []
    if t.adapter:
        base = base_model_ref(t.spec)
        if base.startswith("s3://"):
            init.append(_fetch_container(t, "fetch-base", base, "config.json", f"{MODELS_DIR}/base"))
        init.append(_fetch_container(t, "fetch-adapter", "adapter", ADAPTER_MARKER, f"{MODELS_DIR}/adapter"))
    else:
        init.append(_fetch_container(t, "fetch-weights", t.merged_key, MERGED_MARKER, f"{MODELS_DIR}/merged"))

    env = [{"name": k, "value": v} for k, v in sorted(t.spec.cluster.env.items()) if not k.startswith("AWS_")]
    env += [
        {"name": "TIKTOKEN_ENCODINGS_BASE", "value": VOCAB_DIR},   # baked into the serve image: no internet needed
        {"name": "PYTHONPATH", "value": MIDDLEWARE_DIR},           # gptoss_serve_auth, for --middleware
        {"name": "HOME", "value": CACHE_DIR},
        {"name": "HF_HOME", "value": f"{MODELS_DIR}/hf"},
    ]
    if not (t.adapter and not base_model_ref(t.spec).startswith("s3://")):
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
    else:
        env += hf_token_env(t.spec)
    env += [{"name": k, "value": v} for k, v in sorted(prompt_rule.vllm_env(t.spec.data).items())]
    if s.api_key:
        name, key = api_key_ref(t.spec, t.run_id)
        # vLLM and gptoss_serve_auth read VLLM_API_KEY themselves: the key never appears in the command line.
        env.append({"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": name, "key": key}}})

    startup = startup_budget_s(t.shape, t.tp, "bf16" if t.adapter else t.fmt)
    container = {
        "name": "vllm",
        "image": serve_image(t.spec),
        "command": vv.server_command("python3", []),
        "args": vllm_args(t),
        "env": env,
        "ports": [{"name": "http", "containerPort": t.port, "protocol": "TCP"}],
        "resources": {
            "requests": {"nvidia.com/gpu": str(t.tp), "cpu": str(4 * t.tp), "memory": f"{16 + 16 * t.tp}Gi"},
            "limits": {"nvidia.com/gpu": str(t.tp), "memory": f"{16 + 16 * t.tp}Gi"},
        },
        "startupProbe": _probe("http", 10, math.ceil(startup / 10)),
        "readinessProbe": _probe("http", 10, 3),
        "livenessProbe": _probe("http", 20, 3, timeout=10),
        "securityContext": container_security_context(),
        "volumeMounts": [
            {"name": "models", "mountPath": MODELS_DIR},
            {"name": "cache", "mountPath": CACHE_DIR},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    pod = {
        "securityContext": pod_security_context(),
        "automountServiceAccountToken": False,   # vLLM never talks to the Kubernetes API
        "initContainers": init,
        "containers": [container],
        "terminationGracePeriodSeconds": 60,
        "volumes": [
            {"name": "models", "emptyDir": {"sizeLimit": f"{_gib(t.shape, 'bf16' if t.adapter else t.fmt) + 8}Gi"}},
            {"name": "cache", "emptyDir": {"sizeLimit": "20Gi"}},
            # NCCL between the TP ranks needs more shared memory than the container default.
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}},
        ],
        **_placement(t.spec, gpu=True),
    }
    annotations = {
        "gptoss-cloud.dev/home": t.home,
    } if t.promoted_store is None else {"gptoss-cloud.dev/promoted": join(t.promoted_store, "promoted", f"{t.run_id}.json")}
    annotations |= {
        "gptoss-cloud.dev/serving": "adapter" if t.adapter else t.merged_key,
        "gptoss-cloud.dev/startup-budget-seconds": str(startup),
    }
    meta = _meta(deployment_name(t.run_id), t, "serve")
    meta["annotations"] = annotations
    template_meta: dict = {"labels": labels(t.run_id, "serve")}
    if s.pod_monitor:
        template_meta["annotations"] = scrape_annotations(t)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": s.replicas,
            # Recreate: a rolling update would need a second set of GPUs during the roll.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector(t.run_id)},
            "template": {"metadata": template_meta, "spec": pod},
        },
    }


# ------------------------------------------------------------------------- Service, NetworkPolicy
def service(t: ServeTarget) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(deployment_name(t.run_id), t, "serve"),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(t.run_id),
            "ports": [{"name": "http", "port": t.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def allowed_namespaces(t: ServeTarget) -> list[str]:
    """Clients' namespaces, and Prometheus's: it scrapes /metrics on the same port."""
    scrapers = {t.spec.serve.metrics_namespace} if t.spec.serve.pod_monitor else set()
    return sorted((set(t.spec.serve.allowed_namespaces) or {t.namespace}) | scrapers)


def network_policy(t: ServeTarget) -> dict:
    """Defence in depth beside the API key on every route: admit only the named namespaces, on the API port."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(deployment_name(t.run_id), t, "serve"),
        "spec": {
            "podSelector": {"matchLabels": selector(t.run_id)},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"namespaceSelector": {"matchExpressions": [
                    {"key": "kubernetes.io/metadata.name", "operator": "In", "values": allowed_namespaces(t)},
                ]}}],
                "ports": [{"protocol": "TCP", "port": t.port}],
            }],
        },
    }


def serve_objects(t: ServeTarget) -> list[dict]:
    """In apply order: the merge Job (when needed) first; the Deployment's init container waits for it."""
    objs = [merge_job(t)] if (t.needs_merge and not t.adapter) else []
    from gptoss_cloud.render.k8s.serve_extras import extras

    return objs + [deployment(t), service(t), network_policy(t)] + extras(t)


# ----------------------------------------------------------------------------------- user output
def endpoint(t: ServeTarget) -> str:
    return f"http://{deployment_name(t.run_id)}.{t.namespace}.svc.cluster.local:{t.port}/v1"


def curl_example(base_url: str, model: str, api_key: bool) -> str:
    auth = ' \\\n  -H "Authorization: Bearer $VLLM_API_KEY"' if api_key else ""
    body = '{"model": "%s", "messages": [{"role": "user", "content": "Hello!"}]}' % model
    return f"curl {base_url}/chat/completions \\\n  -H 'Content-Type: application/json'{auth} \\\n  -d '{body}'"
