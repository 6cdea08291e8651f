"""RunSpec: the one description of a run.

Loaded from YAML and validated by pydantic; unknown keys are errors. One precedence order everywhere:

    CLI flag  >  environment (GPTOSS_*)  >  spec file  >  user config (~/.config/gptoss-cloud/config.yaml)  >  default

Each section is owned by the component that reads it (data pipeline, trainer, planner, backends);
later features add fields to their own section. ``version`` is the schema version: a newer CLI reads
older specs, and a pod refuses a spec newer than it understands.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gptoss_cloud.contract import safe_yaml
from gptoss_cloud.contract.datafields import check_property_mappings, role_names
from gptoss_cloud.contract.errors import SpecError

SPEC_VERSION = 1
MAX_SEQ_LEN = 1 << 21  # 2M tokens: 16x GPT-OSS's 131k context, and where plan's longest-sequence search stops
USER_CONFIG_PATH = Path("~/.config/gptoss-cloud/config.yaml")


class Section(BaseModel):
    # No inf/nan anywhere: a non-finite lr or memory size passes every ">" check and breaks the run later.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# ---------------------------------------------------------------------------------------------- model
class ModelSection(Section):
    name: str = Field("tiny", description="20b | 120b | tiny | safeguard-20b | safeguard-120b | local folder | hub id | s3:// prefix")
    init: Literal["pretrained", "random"] = Field(
        "pretrained", description="pretrained: the published/given weights; random: random weights at the model's shape (benchmarks, GPU tests). tiny is always random."
    )
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    layers: int | None = Field(None, ge=1, le=1024, description="override the depth (reduced-depth benchmarks); random init only")
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    base_format: Literal["bf16", "mxfp4"] = Field(
        "bf16", description="how the frozen base experts are held: bf16 (dequantised at load), or mxfp4 (the released "
        "4-bit form, 0.53 byte/weight, dequantised inside the expert GEMMs; LoRA only, not on the experts)"
    )
    cache_dir: str | None = Field(None, description="where base weights are cached once per node")

    @model_validator(mode="after")
    def _layers_need_random(self) -> "ModelSection":
        if self.layers is not None and self.init != "random" and self.name != "tiny":
            raise ValueError("model.layers changes the architecture and needs model.init: random")
        return self


# ----------------------------------------------------------------------------------------------- data
class DatasetSource(Section):
    path: str = Field(..., description="local .jsonl/.json/.parquet file, s3:// URI, hub id (hf://org/name or org/name), or 'sample'")
    split: str = Field("train", description="hub datasets: the split to read")
    subset: str | None = Field(None, description="hub datasets: the configuration (subset) name")
    revision: str | None = Field(None, description="hub datasets: branch, tag or commit")
    weight: float = Field(1.0, gt=0, le=1000, description="mixing weight: each row is used this many times (2: twice, 0.5: a seeded half)")
    format: Literal["auto", "jsonl", "json", "parquet", "hub"] = "auto"
    field_messages: str = "messages"
    field_thinking: str = "thinking"
    field_tools: str = "tools"
    field_reasoning_effort: str = "reasoning_effort"
    message_property_mappings: dict[str, str] = Field(
        default_factory=dict, description="message property -> the key rows store it under (ShareGPT: {role: from, content: value})")
    roles: dict[str, list[str]] = Field(
        default_factory=dict, description="role -> the names rows use for it (e.g. {user: [human], assistant: [gpt, bot]})")

    @field_validator("path")
    @classmethod
    def _known_placeholders(cls, v: str) -> str:
        from gptoss_cloud.contract.templates import placeholders

        placeholders(v)  # expanded at submit (templates.py); an unknown one fails here, naming the field
        return v

    @field_validator("message_property_mappings")
    @classmethod
    def _properties(cls, v):
        return check_property_mappings(v)

    @field_validator("roles")
    @classmethod
    def _roles(cls, v):
        role_names(v)
        return v


class DataSection(Section):
    datasets: list[DatasetSource] = Field(default_factory=lambda: [DatasetSource(path="sample")])
    validation: float | DatasetSource | None = Field(None, description="a held-out fraction (0..0.5) or its own source")
    max_seq_len: int = Field(2048, ge=16, le=MAX_SEQ_LEN, description="packed sequence length (tokens)")
    train_on: Literal["all", "last"] = "all"
    thinking_turns: Literal["expand", "last", "drop"] = "expand"
    reasoning_effort: Literal["low", "medium", "high"] = "medium"
    knowledge_cutoff: str | None = "2024-06"
    conversation_date: str | None = Field(None, description="rendered in the system message only when set (never today's date implicitly)")
    model_identity: str | None = None
    overlong: Literal["drop", "truncate"] = "drop"
    on_error: Literal["fail", "skip"] = "fail"
    max_skip_fraction: float = Field(0.01, ge=0, le=1)
    shuffle: bool = True
    seed: int = Field(0, ge=0, lt=2**32)
    cache_dir: str | None = Field(None, description="tokenized-data cache (default ~/.cache/gptoss-cloud/data)")

    @field_validator("conversation_date", "knowledge_cutoff", mode="before")
    @classmethod
    def _date_text(cls, v):
        # YAML reads an unquoted 2025-06-28 as a date; the system message wants the text.
        import datetime

        return v.isoformat() if isinstance(v, datetime.date) else v

    @field_validator("validation")
    @classmethod
    def _fraction(cls, v):
        if isinstance(v, float) and not 0 < v < 0.5:
            raise ValueError("validation fraction must be between 0 and 0.5")
        return v


# --------------------------------------------------------------------------------------------- method
class LoraSection(Section):
    r: int = Field(16, gt=0, le=4096, description="LoRA rank")
    alpha: int = Field(32, gt=0, le=1 << 16)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    experts: bool = Field(False, description="also adapt mlp.experts.gate_up_proj / down_proj")
    expert_layers: list[Annotated[int, Field(ge=0, le=1023)]] | None = Field(None, description="layers whose experts get LoRA (default: all)")
    router: bool = Field(False, description="also adapt the router")


class MethodSection(Section):
    kind: Literal["lora", "full"] = "lora"
    lora: LoraSection = Field(default_factory=LoraSection)


# ---------------------------------------------------------------------------------------------- optim
class OptimSection(Section):
    # The names fine-tuning users already write (Axolotl's adamw_torch / ao_adamw_8bit); adamw_8bit keeps
    # Adam's moments blockwise-quantised to 8 bits (torchao). docs/optimizers.md: why not 4-bit or fp8.
    name: Literal["adamw", "adamw_8bit"] = Field("adamw", description="adamw (fp32 moments) | adamw_8bit (8-bit moments)")
    master_weights: Literal["fp32", "bf16"] = Field(
        "fp32", description="trainable weights in fp32, or in bf16 updated with stochastic rounding (adamw_8bit only)")
    lr: float = Field(2e-4, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0, le=10)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0, le=1)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(10, ge=0, le=10**9)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    max_grad_norm: float | None = Field(1.0, gt=0, le=1e6)
    epochs: float | None = Field(1.0, gt=0, le=10_000)
    max_steps: int | None = Field(None, gt=0, le=10**9, description="overrides epochs when set")
    micro_batch_size: int = Field(1, gt=0, le=4096, description="packed sequences per GPU per micro-step")
    grad_accum: int = Field(1, gt=0, le=1 << 16)
    router_aux_loss_coef: float | None = Field(None, ge=0, le=100, description="MoE load-balancing loss weight; off when unset")
    eval_every: int | None = Field(None, gt=0, le=10**9)
    log_every: int = Field(1, gt=0, le=10**9)
    seed: int = Field(42, ge=0, lt=2**32)

    @field_validator("name", mode="before")
    @classmethod
    def _known_optimizer(cls, v):
        if v in NOT_OFFERED_OPTIMIZERS:
            raise ValueError(f"{v} is not offered: {NOT_OFFERED_OPTIMIZERS[v]}; use adamw_8bit or adamw")
        return v

    @model_validator(mode="after")
    def _masters_need_rounding(self):
        if self.master_weights == "bf16" and self.name == "adamw":
            # torch's AdamW rounds bf16 weights to nearest: updates below half a bf16 step are lost.
            raise ValueError("master_weights: bf16 needs name: adamw_8bit (stochastic rounding); adamw keeps fp32 weights")
        return self


NOT_OFFERED_OPTIMIZERS = {
    "adamw_4bit": "it ended the 200-step tiny-model test at 2x the loss of fp32 AdamW (docs/optimizers.md)",
    "adamw_fp8": "it ended the 200-step tiny-model test at 5x the loss of fp32 AdamW (docs/optimizers.md)",
}


# ---------------------------------------------------------------------------------------- parallelism
class ParallelismSection(Section):
    nodes: int = Field(1, ge=1, le=4096)
    gpus_per_node: int = Field(8, ge=1, le=16)
    cpu_offload: bool = False
    # Recompute each decoder layer's forward in backward (a third more FLOPs, far less memory). auto:
    # off when the planner finds the run fits the GPU without it, else on (cli/contract/plan/memory.py recompute_on).
    activation_checkpointing: Union[bool, Literal["auto"]] = "auto"
    reshard_after_forward: bool = True
    collective_timeout_s: float = Field(1800.0, gt=0, le=7 * 86400, description="a hung rank fails after this many seconds")


# -------------------------------------------------------------------------------------------- kernels
class KernelsSection(Section):
    # auto: the fast path on GPU (fused experts, flex attention, compiled layers), the eager references on CPU.
    # No "sdpa": PyTorch's SDPA has no learned attention sinks, which GPT-OSS needs.
    # fused: our grouped GEMMs with device-side routing/permutation and a recomputing SwiGLU (kernels/experts.py).
    experts: Literal["auto", "eager", "grouped_mm", "fused"] = "auto"
    # flex: ours (learned sinks with exact gradients, cached block masks); hf_flex: transformers' own.
    attention: Literal["auto", "eager", "flex", "hf_flex"] = "auto"
    loss_chunk_tokens: int = Field(1024, ge=16, le=1 << 20, description="tokens per chunk of the fused linear + cross-entropy")
    # torch.compile each decoder layer's forward (norms, rotary, routing, LoRA and residual adds fused
    # around the GEMMs and attention); the first steps pay the compile. auto: on GPU, off on CPU.
    compile: Union[bool, Literal["auto"]] = "auto"


# ---------------------------------------------------------------------------------------- checkpoint
class CheckpointSection(Section):
    every_steps: int | None = Field(None, gt=0, le=10**9, description="save every N optimizer steps (and always at the end)")
    keep_last: int = Field(2, ge=1, le=10_000)
    async_save: bool = False
    resume: str = Field("auto", description="auto | never | a checkpoint URI")
    local_dir: str | None = Field(None, description="local scratch for shards before upload")
    peer_timeout_s: float = Field(300.0, gt=0, le=86400, description="how long a save waits for the other ranks "
                                  "(their uploaded shards, the save's collectives) before failing, unpublished")
    store_retry_s: float = Field(180.0, ge=0, le=86400, description="how long S3 transient errors (connection "
                                 "errors, 5xx, throttling) are retried with backoff before a checkpoint read or write fails")
    writer_threads: Union[Literal["auto"], Annotated[int, Field(ge=1, le=64)]] = Field(
        "auto", description="files each rank writes its shards into, written and checksummed in parallel (1-64). auto: "
        "this rank's share of the CPU cores it may use (affinity capped by a container's CPU limit, / LOCAL_WORLD_SIZE), at most 8"
    )

    @field_validator("writer_threads", mode="before")
    @classmethod
    def _no_bool(cls, v):
        if isinstance(v, bool):  # YAML's yes/no would otherwise pass as 1 or 0
            raise ValueError("writer_threads must be auto or a whole number from 1 to 64")
        return v


# -------------------------------------------------------------------------------------------- output
class OutputSection(Section):
    store: str = Field("./runs", description="s3://bucket/prefix or a local folder; each run lives at <store>/<run-id>/")
    merge: bool = Field(True, description="merge into a servable Hugging Face folder at the end of training")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="experiment trackers rank 0 also reports to (any of tensorboard, wandb, mlflow; "
        "each needs its extra: pip install 'gptoss-cloud[tensorboard]'); credentials from the environment, see docs/tracking.md"
    )

    @field_validator("report_to")
    @classmethod
    def _once_each(cls, v: list[str]) -> list[str]:
        dup = sorted({x for x in v if v.count(x) > 1})
        if dup:
            raise ValueError(f"output.report_to names {', '.join(dup)} more than once")
        return v


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
    checkpoint: str = Field("latest", description="latest (the run's merged/ folder) or a step number to merge and serve")
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


# ------------------------------------------------------------------------------------------- promote
class PromoteSection(Section):
    """Gated promotion (docs/gitops-promotion.md): after each run, evaluate it on a fixed held-out set and
    move the record ``<store>/promoted/<name>.json`` to it only when the gate holds."""

    name: str = Field(..., description="the promotion record's name (promoted/<name>.json; the served model's name)")
    eval_data: str = Field(..., description="held-out file every candidate is evaluated on (the same for every tick)")
    samples: int = Field(8, ge=1, le=10_000, description="replies generated for the harmony checks")
    max_new_tokens: int = Field(256, ge=1, le=1 << 16, description="token limit of each generated reply")
    max_eval_loss_regression: float = Field(
        0.0, ge=0, le=100, description="eval loss may be worse than the promoted run's by at most this much (nats per token)")
    max_eval_loss: float | None = Field(None, gt=0, le=1000, description="absolute ceiling on eval loss (also for the first run)")
    min_format_valid_rate: float | None = Field(
        None, ge=0, le=1, description="fraction of generated replies that must pass every harmony check (also for the first run)")
    min_eval_tokens: int = Field(1, ge=1, le=10**12, description="refuse an evaluation over fewer trained tokens than this")
    restart_deployment: bool = Field(
        True, description="k8s: after a promotion, restart Deployment vllm-<name> (serve --promoted) so it loads the new run")

    @field_validator("name")
    @classmethod
    def _record_name(cls, v: str) -> str:
        from gptoss_cloud.contract.promoted import NAME_RE

        if not NAME_RE.fullmatch(v):
            raise ValueError("promote.name must be 1-40 lowercase letters, digits or '-', starting and ending with a "
                             "letter or digit (it names a store key and the Deployment vllm-<name>)")
        return v

    @field_validator("eval_data")
    @classmethod
    def _fixed_data(cls, v: str) -> str:
        if "{" in v or "}" in v:
            raise ValueError("promote.eval_data must be one fixed held-out file, not a template: "
                             "ticks are compared on the same data")
        if not v.strip():
            raise ValueError("promote.eval_data is empty")
        return v


# ---------------------------------------------------------------------------------------------- spec
class RunSpec(Section):
    version: int = SPEC_VERSION
    name: str = Field("gptoss", description="run name (prefix of the run id)")
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    method: MethodSection = Field(default_factory=MethodSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    parallelism: ParallelismSection = Field(default_factory=ParallelismSection)
    kernels: KernelsSection = Field(default_factory=KernelsSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    output: OutputSection = Field(default_factory=OutputSection)
    cluster: ClusterSection = Field(default_factory=ClusterSection)
    serve: ServeSection = Field(default_factory=ServeSection)
    promote: PromoteSection | None = Field(None, description="gated promotion after each run; off when unset")

    @field_validator("version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v > SPEC_VERSION:
            raise ValueError(
                f"spec version {v} is newer than this gptoss-cloud understands ({SPEC_VERSION}); upgrade gptoss-cloud"
            )
        if v < 1:
            raise ValueError("spec version must be >= 1")
        return v

    @field_validator("name")
    @classmethod
    def _dns_name(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,28}[a-z0-9])?", v):
            raise ValueError(
                "name must be 1-30 lowercase letters, digits or '-', starting and ending with a letter or digit "
                "(it prefixes Kubernetes names)"
            )
        return v

    # -------------------------------------------------------------------------------- YAML in/out
    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @property
    def world_size(self) -> int:
        return self.parallelism.nodes * self.parallelism.gpus_per_node


# ----------------------------------------------------------------------------------------- loading
# Environment variables that map to spec fields. Any field is also reachable as
# GPTOSS_<SECTION>__<FIELD> (double underscore between levels), e.g. GPTOSS_OPTIM__LR=1e-4.
ENV_ALIASES: dict[str, str] = {
    "GPTOSS_BACKEND": "cluster.backend",
    "GPTOSS_NAMESPACE": "cluster.namespace",
    "GPTOSS_CONTEXT": "cluster.context",
    "GPTOSS_IMAGE": "cluster.image",
    "GPTOSS_STORE": "output.store",
    "GPTOSS_MODEL": "model.name",
}


def set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            node[k] = nxt
        node = nxt
    node[keys[-1]] = value


def deep_merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def env_overrides(environ: Mapping[str, str]) -> dict:
    tree: dict = {}
    for var, dotted in ENV_ALIASES.items():
        if environ.get(var):
            set_path(tree, dotted, environ[var])
    for var, value in environ.items():
        if var.startswith("GPTOSS_") and "__" in var:
            dotted = var[len("GPTOSS_"):].lower().replace("__", ".")
            set_path(tree, dotted, safe_yaml.load(value, f"environment variable {var}") if value else value)
    return tree


def read_yaml_mapping(path: Path, what: str) -> dict:
    try:
        with path.open("rb") as f:
            raw = f.read(safe_yaml.MAX_BYTES + 1)
    except FileNotFoundError:
        raise SpecError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise SpecError(f"{what} {path} is a folder, not a YAML file") from None
    except OSError as e:
        raise SpecError(f"{what} {path} cannot be read: {e.strerror or e}") from None
    data = safe_yaml.load(raw, f"{what} {path}") or {}
    if not isinstance(data, dict):
        raise SpecError(f"{what} {path} must be a YAML mapping, not {type(data).__name__}")
    return data


MAX_REPORTED_ERRORS = 20  # a hostile spec can hold thousands of bad keys; the first ones say enough


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid run spec ({source}):"]
    errors = err.errors()
    for e in errors[:MAX_REPORTED_ERRORS]:
        loc = safe_yaml.quote(".".join(str(p) for p in e["loc"]) or "<root>").strip("'\"")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `gptoss-cloud init` writes every key with comments)"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        elif e["type"] == "literal_error":
            msg = f"{msg}; got {safe_yaml.quote(e.get('input'))}"
        lines.append(f"  {msg}" if msg.startswith(f"{loc}.") else f"  {loc}: {msg}")
    if len(errors) > MAX_REPORTED_ERRORS:
        lines.append(f"  ... and {len(errors) - MAX_REPORTED_ERRORS} more")
    return "\n".join(lines)


def load_spec(
    path: str | Path | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    user_config: str | Path | None = None,
) -> RunSpec:
    """Resolve a RunSpec: flags (``overrides``, dotted keys) > env > spec file > user config > defaults."""
    environ = os.environ if environ is None else environ
    tree: dict = {}
    sources = []
    ucfg = Path(user_config) if user_config else Path(environ.get("GPTOSS_CONFIG", str(USER_CONFIG_PATH))).expanduser()
    if ucfg.is_file():
        tree = deep_merge(tree, read_yaml_mapping(ucfg, "user config"))
        sources.append(str(ucfg))
    if path is not None:
        tree = deep_merge(tree, read_yaml_mapping(Path(path), "spec file"))
        sources.append(str(path))
    env_tree = env_overrides(environ)
    if env_tree:
        tree = deep_merge(tree, env_tree)
        sources.append("environment")
    flag_tree: dict = {}
    for dotted, value in (overrides or {}).items():
        if value is not None:
            set_path(flag_tree, dotted, value)
    if flag_tree:
        tree = deep_merge(tree, flag_tree)
        sources.append("flags")
    # A section whose keys are all commented out parses as null: it means "all defaults".
    for key, field in RunSpec.model_fields.items():
        if key in tree and tree[key] is None and isinstance(field.default_factory, type):
            tree[key] = {}
    try:
        return RunSpec.model_validate(tree)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, " + ".join(sources) or "defaults")) from None


def spec_from_yaml_text(text: str | bytes, source: str = "<spec>") -> RunSpec:
    """Parse a resolved spec (as stored in a run home or a ConfigMap); no env or user config applied."""
    data = safe_yaml.load(text, source) or {}
    if not isinstance(data, dict):
        raise SpecError(f"{source} must be a YAML mapping, not {type(data).__name__}")
    try:
        return RunSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, source)) from None
