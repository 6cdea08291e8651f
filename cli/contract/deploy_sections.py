"""The deployment sections of a RunSpec: where a run trains (``cluster``, with its Truss settings) and how its
model is served (``serve``). The backends and the serving renderers read them; the trainer never does.
``RunSpec`` (gptoss_cloud.contract.spec) holds them beside the training sections (gptoss_cloud.contract.sections).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from gptoss_cloud.contract.sections import Section


# ------------------------------------------------------------------------------------------- cluster
class SecretRef(Section):
    name: str
    key: str | None = None


class TrussSection(Section):
    """Baseten Truss training settings (`--backend truss`)."""

    project: str | None = Field(None, description="Baseten training project name (default: the spec's name)")
    accelerator: str | None = Field(None, description="Baseten accelerator type, e.g. H100 or H200 (default: cluster.gpu_type); the count is parallelism.gpus_per_node")
    base_image: str | None = Field(None, description="trainer image for the job (default: cluster.image, then ghcr.io/gptoss-cloud/trainer:<version>)")
    cache: bool = Field(True, description="keep the project cache (base weights download once per project, shared by the job's nodes)")
    checkpointing: bool = Field(True, description="give the job Baseten's checkpoint volume as local scratch; checkpoints are published to output.store either way")
    checkpoint_volume_gib: int | None = Field(None, gt=0, le=1 << 20, description="size of that volume (default: Baseten's)")
    secrets: dict[str, str | None] = Field(
        default_factory=dict,
        description="environment variable -> Baseten secret name; added to (or, with null, removing) the defaults "
        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (s3:// store), HF_TOKEN (cluster.hf_token_secret), GPTOSS_CHECKPOINT_KEY (cluster.checkpoint_key_secret)",
    )


class ClusterSection(Section):
    backend: Literal["local", "k8s", "truss"] = "local"
    namespace: str = "default"
    context: str | None = None
    image: str | None = Field(None, description="trainer image; default ghcr.io/gptoss-cloud/trainer:<version>")
    gpu_type: str = "H100"
    gpu_memory_gib: float = Field(80.0, gt=0, le=4096)
    host_memory_gib: float | None = Field(None, gt=0, le=1 << 20, description="host RAM per node (default from gpu_type: 1800 for 8xH100)")
    local_disk_gib: float | None = Field(None, gt=0, le=1 << 30)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    priority_class: str | None = None
    service_account: str | None = None
    queue: str | None = Field(None, description="Kueue LocalQueue name")
    rdma: Literal["none", "efa", "infiniband"] = Field(
        "none", description="fast interconnect; efa/infiniband relax pod security exactly as needed (IPC_LOCK, devices)"
    )
    rdma_resource: str | None = Field(None, description="RDMA device resource (default vpc.amazonaws.com/efa or rdma/rdma_shared_device_a)")
    rdma_devices: int | None = Field(None, ge=1, le=1024, description="RDMA devices per pod (default 32 for efa, 1 for infiniband)")
    affinity: dict[str, Any] | None = Field(None, description="pod affinity (Kubernetes Affinity object)")
    shm_gib: int = Field(64, ge=1, le=1 << 20, description="size of /dev/shm (memory emptyDir) per pod")
    weights_mirror: str | None = Field(None, description="s3:// prefix holding a copy of the base weights (else the hub)")
    cache_storage_class: str | None = Field(
        None, description="storage class for the per-node weights cache (generic ephemeral volume); default an emptyDir"
    )
    rendezvous_port: int = Field(29500, ge=1024, le=65535)
    max_restarts: int = Field(3, ge=0, le=1000)
    ttl_seconds_after_finished: int | None = Field(86400, ge=0, le=2**31 - 1)
    store_secret: SecretRef | None = Field(None, description="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for the store")
    hf_token_secret: SecretRef | None = None
    checkpoint_key_secret: SecretRef | None = None
    env: dict[str, str] = Field(default_factory=dict, description="extra non-secret environment for the pods (credentials are refused: see secret_env)")
    secret_env: dict[str, SecretRef] = Field(
        default_factory=dict, description="environment variable -> Kubernetes Secret (name, key; key defaults to the "
        "variable's name) for credentials the pods need, e.g. WANDB_API_KEY; with --backend truss, name is the Baseten secret"
    )
    gpu_price_per_hour: float | None = Field(None, ge=0, le=10_000, description="USD per GPU-hour, for plan's cost estimate")
    truss: TrussSection = Field(default_factory=TrussSection)

    @model_validator(mode="after")
    def _no_credentials_in_plain_env(self) -> "ClusterSection":
        from gptoss_cloud.contract.credentials import check_plain_env, check_reference_names

        check_plain_env(self.env, "cluster.env", self.backend)
        for name in self.secret_env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"cluster.secret_env.{name}: not a valid environment variable name")
            if name in self.env:
                raise ValueError(f"cluster.env.{name} is also in cluster.secret_env; keep only the Secret reference")
        check_reference_names(self.secret_env, "cluster.secret_env")
        check_reference_names(self.truss.secrets, "cluster.truss.secrets")
        refs = {"store_secret": self.store_secret, "hf_token_secret": self.hf_token_secret,
                "checkpoint_key_secret": self.checkpoint_key_secret}
        check_reference_names({k: v for k, v in refs.items() if v is not None}, "cluster")
        return self


# --------------------------------------------------------------------------------------------- serve
class ServeSection(Section):
    tp: int | None = Field(None, ge=1, le=64, description="tensor parallel size (default: sized from model and GPU memory)")
    replicas: int = Field(1, ge=1, le=1000)
    checkpoint: str = Field("latest", description="latest (the run's final merge) or a step number to merge and serve")
    format: Literal["auto", "bf16", "mxfp4"] = Field(
        "auto", description="which merged folder to serve: mxfp4 (merged-mxfp4/), bf16 (merged/), or auto = mxfp4 when "
        "published, else bf16; with neither published, the merge writes this format (auto: what output.merge_format "
        "resolves to, mxfp4 first). TP is sized for it (docs/serving-sizes.md)")
    kv_sequences: int = Field(
        2, ge=1, le=4096, description="full-length (max_model_len) sequences the KV cache must hold at once when TP is "
        "sized; vLLM itself needs 1 (docs/serving-sizes.md)")
    adapter: bool = Field(False, description="serve the base model plus the LoRA adapter (vLLM --enable-lora) instead of merged weights")
    max_model_len: int = Field(32768, ge=256, le=1 << 24)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    port: int = Field(8000, ge=1024, le=65535, description="container port of the OpenAI-compatible server (non-root: >= 1024)")
    api_key: bool = Field(True, description="require an API key on every route but /health and /metrics (VLLM_API_KEY from a Secret)")
    api_key_secret: SecretRef | None = Field(None, description="Secret holding the API key (default: <deployment>-api-key, key api-key)")
    allowed_namespaces: list[str] = Field(default_factory=list, description="namespaces whose pods may reach the server (default: its own)")
    pod_monitor: bool = Field(False, description="scrape vLLM's /metrics: a Prometheus Operator PodMonitor, prometheus.io annotations, and the NetworkPolicy admitting metrics_namespace")
    metrics_namespace: str = Field("monitoring", description="namespace of the Prometheus that scrapes /metrics (admitted by the NetworkPolicy)")
    image: str | None = Field(None, description="vLLM image; default ghcr.io/gptoss-cloud/serve:<version>")

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint(cls, v: str) -> str:
        if v != "latest" and not v.isdigit():
            raise ValueError("serve.checkpoint must be 'latest' or a step number")
        return v
