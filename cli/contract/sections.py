"""The sections of a RunSpec, each owned by the component that reads it.

The data pipeline reads ``data``, the model builder ``model``, ``method`` and ``kernels``, the loop
``optim``, the process group and sharding ``parallelism``, the checkpointer ``checkpoint``, the
backends ``cluster`` and ``serve``. Each is validated when built: unknown keys, non-finite numbers
and out-of-range values are errors naming the field. ``RunSpec`` (gptoss_cloud.contract.spec) holds them.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from gptoss_cloud.contract.datafields import check_property_mappings, role_names

MAX_SEQ_LEN = 1 << 21  # 2M tokens: 16x GPT-OSS's 131k context, and where plan's longest-sequence search stops

def _auto_or_count(v, what: str, most: int):
    if isinstance(v, bool):  # YAML's yes/no would otherwise pass as 1 or 0
        raise ValueError(f"{what} must be auto or a whole number from 1 to {most}")
    return v


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
    qat: Literal["none", "mxfp4"] = Field(
        "none", description="quantisation-aware training: mxfp4 trains the experts as they will be served "
        "(MXFP4 fake quantisation in the forward, straight-through gradient); needs trainable experts "
        "(kind: full, or lora.experts: true). Costs one pass over each expert matrix per forward (one "
        "compiled kernel on a GPU, ~1 ms per 20b layer), nothing in backward; docs/qat.md")

    @model_validator(mode="after")
    def _qat_needs_trained_experts(self):
        if self.qat != "none" and self.kind == "lora" and not self.lora.experts:
            raise ValueError(f"method.qat: {self.qat} quantises the experts as they train, but these experts are frozen "
                             "(method.kind: lora without lora.experts: true); set lora.experts: true, use kind: full, "
                             "or drop method.qat (frozen MXFP4 experts export byte for byte anyway)")
        return self


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
    step_split: bool = Field(
        False, description="time each step's phases (data, forward + backward, optimizer) into metrics.jsonl "
        "(step_s, data_s, fwd_bwd_s, optimizer_s); on a GPU this synchronises the device twice a step")
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
    cpu_threads: Union[Literal["auto"], Annotated[int, Field(ge=1, le=1024)]] = Field(
        "auto", description="host threads per rank for the offloaded optimizer step (cpu_offload; 1-1024). auto: this "
        "rank's share of the cores it may use (affinity capped by a container's CPU limit, / LOCAL_WORLD_SIZE)")

    activation_offload: bool = Field(False, description="keep the checkpointed layer inputs (and what else autograd "
        "saves outside the layers; never parameters) in pinned host memory until backward (docs/long-context.md); "
        "needs activation_checkpointing: true or auto (auto then turns it on)")
    # 1: a decoder layer is one FSDP2 unit. N: each layer's experts are N more units of E/N experts, so
    # FSDP2's gather and gradient buffers are a unit's size, not a layer's (trainer/kernels/expert_units.py).
    expert_units: int = Field(1, ge=1, le=128, description="FSDP2 units per layer's experts: N splits them into N "
        "units of experts/N experts each, so the gathered weights and the gradient buffers are 1/N of a layer's "
        "experts (one host read of N row counts per layer call); for dense experts (full fine-tuning or LoRA off "
        "the experts, bf16 base); N must divide the experts (20b: 32, 120b: 128)")
    @field_validator("cpu_threads", mode="before")
    @classmethod
    def _threads_no_bool(cls, v):
        return _auto_or_count(v, "cpu_threads", 1024)

    @model_validator(mode="after")
    def _offload_needs_recompute(self) -> "ParallelismSection":
        if self.activation_offload and self.activation_checkpointing is False:
            raise ValueError("parallelism.activation_offload keeps the checkpointed layer inputs on the host: it needs "
                             "activation_checkpointing: true or auto, not false")
        return self


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
    experts_compile: bool = Field(
        True, description="on a GPU, torch.compile the fused experts' clamped SwiGLU into one kernel each way "
        "(kernels.experts: fused, and MXFP4 experts); false keeps it eager")
    mxfp4_dequant: Literal["auto", "torch", "triton", "gemm"] = Field(
        "auto", description="how MXFP4 experts (model.base_format: mxfp4) are decoded on a GPU: auto (the Triton "
        "dequantiser when Triton is installed, else torch ops), torch, triton, or gemm (decoded inside the grouped "
        "GEMM by a Triton kernel; slower today, docs/experts.md)")
    # StrictInt: YAML's yes/no would otherwise pass as a tile of 1 or 0 tokens.
    moe_tile_tokens: Union[None, Annotated[StrictInt, Field(ge=1, le=MAX_SEQ_LEN)]] = Field(None, description="fused and "
        "MXFP4 experts over tiles of this many tokens, each recomputed in backward: the MoE working set is one tile's "
        "(docs/long-context.md); unset: the whole sequence at once")


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
        return _auto_or_count(v, "writer_threads", 64)


# -------------------------------------------------------------------------------------------- output
class OutputSection(Section):
    store: str = Field("./runs", description="s3://bucket/prefix or a local folder; each run lives at <store>/<run-id>/")
    merge: bool = Field(True, description="merge into a servable Hugging Face folder at the end of training")
    merge_format: Literal["auto", "bf16", "mxfp4", "both"] = Field(
        "auto", description="what the merge writes: bf16 (merged/), mxfp4 (merged-mxfp4/: experts in the release's "
        "MXFP4 layout, a quarter of the size), or both; auto = mxfp4 when nothing learned is lost to it (method.qat: "
        "mxfp4, or experts left untrained over a base that holds them in MXFP4), else bf16. serve uses the MXFP4 folder when it exists (docs/serving-mxfp4.md)")
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
