"""Memory, disk, time and cost planner: pure functions of (RunSpec, ModelShape).

The trainer and ``submit`` call :func:`check_fit` before any model loads; ``gptoss-cloud plan`` prints
:func:`plan_run`. Every constant below is an assumption written down so that it can be calibrated
against measurements (docs/plan.md lists them and the H100 numbers they were checked against).

Model of one GPU (FSDP2 over ``world = nodes x gpus_per_node`` ranks, bf16 compute):

* frozen base weights (LoRA): bf16, sharded ``/ world``;
* trainable parameters: master weight + gradient + two Adam moments, 16 bytes each with fp32
  AdamW, 6.03 with 8-bit moments and bf16 masters (``optim_bytes``), sharded ``/ world`` (on the
  host instead with ``cpu_offload``);
* FSDP2 all-gather buffers: two unsharded layers in flight (current + prefetch), or the whole
  model when ``reshard_after_forward`` is off; full fine-tuning adds the unsharded gradient of a
  layer (bf16 from autograd + fp32 for the reduce-scatter);
* activations for ``micro_batch x max_seq_len`` tokens: every layer's input when activation
  checkpointing is on plus one layer recomputed with its gradients, else every layer's saved
  tensors; eager attention adds the ``seq x seq`` score matrices of one layer; MoE routing keeps
  the top-k permuted token copies;
* the chunked loss: one ``loss_chunk_tokens x vocab`` logits chunk (bf16 logits, fp32 copy, fp32
  gradient);
* with CPU offload, instead of the all-gather and gradient buffers: one set of host-device copy,
  all-gather and reduce-scatter buffers for the root unit (embedding + head) and one for a layer;
* compiled decoder layers (``kernels.compile``) save about 0.7 of eager's activations and recompute
  a layer in about half its working set;
* the caching allocator reserves more than it hands out (``allocator_overhead``: little for one GPU,
  about a sixth more for sharded full fine-tuning, as measured on H100s), and the CUDA context and NCCL
  buffers live outside it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from gptoss_cloud.contract.errors import PlanError, SpecError
from gptoss_cloud.contract.plan.optim_bytes import checkpoint_bytes_per_param, label, trainable_bytes
from gptoss_cloud.contract.shapes import ModelShape, shape_for
from gptoss_cloud.contract.spec import RunSpec
from gptoss_cloud.contract.sections import MAX_SEQ_LEN

GiB = 1024**3
GB = 1000**3

# ---- assumptions (calibrate against docs/benchmarks.md) -------------------------------------
BF16 = 2
FP32 = 4
LOGITS_BYTES_PER_ELEM = BF16 + FP32 + FP32  # chunk logits, fp32 upcast for the loss, fp32 gradient
EAGER_ATTN_SCORE_TENSORS = 2.5             # s x s bf16 tensors alive at the peak of an eager layer's backward
BACKWARD_LAYER_FACTOR = 2.0                # a layer's backward holds its activations and their gradients
ALLOCATOR_OVERHEAD = 1.05                  # torch caching allocator: reserved / allocated at the peak (1 GPU: 1.02-1.07)
# FSDP2 full fine-tuning: all-gather and reduce-scatter buffers of many sizes on two streams fragment
# the cache (2 x H100 reserved 1.31-1.32x what was allocated for 20b at 6 layers, 1.69x for 120b at
# 1 layer, against allocations the component model over-counts); with the root unit counted, 1.16
# plans both 1% above what the cards reserved.
ALLOCATOR_OVERHEAD_SHARDED_FULL = 1.16
# CPU offload: each FSDP2 unit's parameters and gradients cross the bus every step, through buffers of
# that unit's sizes, and the cache keeps one set per size class (the root unit: embedding + head, and a
# decoder layer). Per parameter of a unit, full fine-tuning: the fp32 shard copied in (4/world), its bf16
# cast (2/world), the all-gathered bf16 weights (2), the bf16 gradient (2), the fp32 reduce-scatter input
# (4) and output shard (4/world). Against 2 x H100/H200 this plans 20b at 6 layers at 27.7 GiB (measured
# 23.3) and one 120b layer at 56.1 (measured 50.8): the allocator reuses a little across classes.
OFFLOAD_FULL_UNIT_BYTES = (8.0, 10.0)      # bytes per unit parameter: constant + per-1/world term
OFFLOAD_LORA_UNIT_BYTES = (4.0, 2.0)       # frozen bf16 shard copied in + all-gathered current and prefetched (not measured)
ALLOCATOR_OVERHEAD_OFFLOAD = 1.0           # the buffers above are what the cache holds
# Compiled decoder layers (kernels.compile, on by default on GPUs) save fewer tensors than eager ones:
# the partitioner recomputes cheap elementwise ops in backward instead of saving their outputs, and
# fused kernels need fewer temporaries. 20b LoRA on H100/H200: the saved activations of all layers
# 0.61-0.70 of eager's (4,096 tokens), one recomputed layer's working set 0.35-0.64 (4K and 64K).
LORA_EXPERT_WORKING_COPIES = 3             # LoRA on experts: W + B·A, B·A and the gradient of W + B·A, per layer
COMPILED_SAVED_FACTOR = 0.70
COMPILED_RECOMPUTE_FACTOR = 0.50
CUDA_CONTEXT_GIB = 0.6                     # CUDA context + cuBLAS workspaces, outside torch's reserved memory
NCCL_GIB = 1.0                             # NCCL communicator buffers when world > 1
GPU_HEADROOM = 0.95                        # plan to use at most this fraction of a GPU's memory
HOST_PER_PROCESS_GIB = 8.0                 # python, CUDA host state, dataloader per GPU process
HOST_HEADROOM = 0.9
ASSUMED_MFU = 0.25                         # achieved / peak bf16 FLOPs, recompute included (transformers+peft measured ~0.18)
MXFP4_BYTES_PER_EXPERT_PARAM = 4.25 / 8    # the published checkpoints store experts in MXFP4 (4-bit + scales)


@dataclass(frozen=True)
class Gpu:
    memory_gib: float
    bf16_tflops: float          # dense peak
    host_gib_per_gpu: float     # typical host RAM per GPU of a node of these cards


GPUS: dict[str, Gpu] = {
    "H100": Gpu(80, 989, 225),
    "H200": Gpu(141, 989, 256),
    "GH200": Gpu(96, 989, 480),
    "B200": Gpu(180, 2250, 256),
    "A100": Gpu(80, 312, 140),
    "A100-40GB": Gpu(40, 312, 140),
    "L40S": Gpu(48, 362, 128),
}


def gpu_info(spec: RunSpec) -> Gpu:
    """The card: its catalog entry, with the spec's explicit memory figures winning."""
    c = spec.cluster
    base = GPUS.get(c.gpu_type.upper().replace("_", "-"))
    if base is None:  # unknown card: trust the spec's memory, assume H100-class compute
        return Gpu(c.gpu_memory_gib, 989, 225)
    mem = c.gpu_memory_gib if "gpu_memory_gib" in c.model_fields_set else base.memory_gib
    return Gpu(mem, base.bf16_tflops, base.host_gib_per_gpu)


# ---------------------------------------------------------------------------------- parameters
def lora_params(shape: ModelShape, spec: RunSpec) -> int:
    """Trainable LoRA parameters for the spec's targets (A: r x in, B: out x r)."""
    lora = spec.method.lora
    r, h = lora.r, shape.hidden_size
    q, kv = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    dims = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
    per_layer = sum(r * (i + o) for name, (i, o) in dims.items() if name in lora.target_modules)
    total = shape.num_hidden_layers * per_layer
    if lora.experts:
        layers = len(lora.expert_layers) if lora.expert_layers is not None else shape.num_hidden_layers
        i = shape.intermediate_size
        per_expert = r * (h + 2 * i) + r * (i + h)
        total += layers * shape.num_local_experts * per_expert
    if lora.router:
        total += shape.num_hidden_layers * r * (h + shape.num_local_experts)
    return total


def trainable_params(shape: ModelShape, spec: RunSpec) -> int:
    return lora_params(shape, spec) if spec.method.kind == "lora" else shape.total_params


# ---------------------------------------------------------------------------------- activations
def layer_activation_bytes(shape: ModelShape, tokens: int) -> float:
    """Saved tensors of one decoder layer for ``tokens`` tokens (bf16; router in fp32)."""
    h, i, k, e = shape.hidden_size, shape.intermediate_size, shape.num_experts_per_tok, shape.num_local_experts
    q, kv = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    # norms in/out x2, residual adds x2; q,k,v; attention output x2 (before/after o_proj input);
    # MoE: top-k permuted inputs, gate_up output, activation, down output.
    per_token = BF16 * (6 * h + 2 * q + 2 * kv + k * (2 * h + 3 * i)) + FP32 * (shape.num_attention_heads + e + k)
    return per_token * tokens


def eager_attention_bytes(shape: ModelShape, micro_batch: int, seq: int) -> float:
    return EAGER_ATTN_SCORE_TENSORS * BF16 * micro_batch * shape.num_attention_heads * seq * (seq + 1)


def compiled_layers(spec: RunSpec) -> bool:
    """Whether decoder layers run under torch.compile: ``auto`` compiles on GPUs, which is what plans are for."""
    return spec.kernels.compile is not False


def attention_kind(spec: RunSpec) -> str:
    # "auto" resolves to a fused kernel on GPUs (flex / sdpa): no s x s matrix is kept.
    return "eager" if spec.kernels.attention == "eager" else "fused"


# ---------------------------------------------------------------------------------- memory plan
@dataclass
class MemoryPlan:
    model: str
    method: str
    nodes: int
    gpus_per_node: int
    gpu_type: str
    gpu: dict[str, float]              # GiB per GPU by component
    gpu_reserved_gib: float            # torch peak reserved (comparable to torch.cuda.max_memory_reserved)
    gpu_total_gib: float               # + CUDA context and NCCL
    gpu_capacity_gib: float            # usable: memory x GPU_HEADROOM
    host: dict[str, float]             # GiB per node by component
    host_total_gib: float
    host_capacity_gib: float
    fits: bool
    problems: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """One paragraph: what was planned and why it does (not) fit."""
        s = self.settings
        head = (
            f"{self.model} {self.method} on {self.nodes}x{self.gpus_per_node} {self.gpu_type} "
            f"(micro_batch {s.get('micro_batch_size')}, max_seq_len {s.get('max_seq_len')}, "
            f"activation_checkpointing {s.get('activation_checkpointing')}, cpu_offload {s.get('cpu_offload')}): "
            f"GPU {self.gpu_total_gib:.1f} of {self.gpu_capacity_gib:.1f} GiB, "
            f"host {self.host_total_gib:.0f} of {self.host_capacity_gib:.0f} GiB per node"
        )
        return head if not self.problems else head + "; " + "; ".join(self.problems)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_shape(spec: RunSpec, shape: ModelShape | None = None) -> ModelShape:
    if shape is not None:
        return shape
    try:
        return shape_for(spec.model.name, spec.model.layers)
    except ValueError as e:
        raise SpecError(f"model.name: {e}") from None


def _gpu_components(shape: ModelShape, spec: RunSpec) -> dict[str, float]:
    p = spec.parallelism
    world = spec.world_size
    full = spec.method.kind == "full"
    trainable = trainable_params(shape, spec)
    offload = p.cpu_offload
    per_param = trainable_bytes(spec.optim)
    b, s = spec.optim.micro_batch_size, spec.data.max_seq_len
    tokens = b * s
    out: dict[str, float] = {}

    # Sharded state (on the host with offload).
    if full:
        out[f"params+grads+adam ({label(spec.optim)}, sharded)"] = 0.0 if offload else shape.total_params * per_param / world
    elif spec.model.base_format == "mxfp4":
        # Frozen experts stay packed (4-bit + scales) and, being buffers, are not sharded by FSDP2;
        # one chunk of up to 32 experts is dequantised to bf16 at a time inside the expert GEMMs.
        experts = shape.expert_params_total
        out["base weights (bf16 non-expert, sharded)"] = 0.0 if offload else (shape.total_params - experts) * BF16 / world
        out["frozen experts (MXFP4, replicated)"] = experts * MXFP4_BYTES_PER_EXPERT_PARAM
        out["dequantised expert chunk (bf16)"] = min(32, shape.num_local_experts) * shape.expert_params * BF16
        out[f"lora params+grads+adam ({label(spec.optim)})"] = 0.0 if offload else trainable * per_param / world
    else:
        out["base weights (bf16, sharded)"] = 0.0 if offload else shape.total_params * BF16 / world
        out[f"lora params+grads+adam ({label(spec.optim)})"] = 0.0 if offload else trainable * per_param / world

    # FSDP2 unsharded buffers. One rank without offload has nothing to gather.
    biggest = max(shape.layer_params, shape.embedding_params)
    root = shape.total_params - shape.num_hidden_layers * shape.layer_params  # the root unit: embedding, head, final norm
    if offload:
        const, per_rank = OFFLOAD_FULL_UNIT_BYTES if full else OFFLOAD_LORA_UNIT_BYTES
        out["offload copy buffers (root unit + a layer)"] = (root + shape.layer_params) * (const + per_rank / world)
    elif world > 1:
        if p.reshard_after_forward:
            out["all-gather buffers (2 layers, bf16)"] = 2 * biggest * BF16
            # FSDP2 does not reshard the root after forward (backward needs it at once): the embedding
            # and head stay gathered through the step, beside the layers' buffers.
            out["root unit kept gathered (embedding + head, bf16)"] = root * BF16
        else:
            out["unsharded weights (no reshard, bf16)"] = shape.total_params * BF16
    if full and not offload:
        out["layer gradient buffers (bf16 + fp32 reduce)"] = biggest * (BF16 + FP32)

    # Activations.
    layer = layer_activation_bytes(shape, tokens)
    compiled = compiled_layers(spec)
    if recompute_on(spec, shape):
        out["checkpointed layer inputs"] = shape.num_hidden_layers * tokens * shape.hidden_size * BF16
        out["one layer recomputed + its grads"] = layer * BACKWARD_LAYER_FACTOR * (COMPILED_RECOMPUTE_FACTOR if compiled else 1.0)
    else:  # + the gradient working set of one layer
        out["activations (all layers)"] = (shape.num_hidden_layers * layer + layer) * (COMPILED_SAVED_FACTOR if compiled else 1.0)
    lora = spec.method.lora
    if not full and lora.experts:
        # peft adapts the 3-D expert weights through a parametrization: every access builds W + B·A
        # whole (the layer's gathered bf16 experts), backward builds its gradient too. Recomputed
        # layers hold that for one layer at a time; otherwise each adapted layer keeps its W + B·A.
        # From the mechanism, not yet measured on a GPU.
        w = shape.num_local_experts * shape.expert_params * BF16
        adapted = len(lora.expert_layers) if lora.expert_layers is not None else shape.num_hidden_layers
        if recompute_on(spec, shape):
            out["LoRA experts: W + B·A, B·A and its gradient (one layer)"] = LORA_EXPERT_WORKING_COPIES * w
        else:
            out["LoRA experts: W + B·A kept per adapted layer"] = adapted * w + (LORA_EXPERT_WORKING_COPIES - 1) * w
    if attention_kind(spec) == "eager":
        out["eager attention scores (one layer)"] = eager_attention_bytes(shape, b, s)
    chunk = min(spec.kernels.loss_chunk_tokens, tokens)
    out["loss logits chunk"] = chunk * shape.vocab_size * LOGITS_BYTES_PER_ELEM + 2 * tokens * shape.hidden_size * BF16
    return {k: v / GiB for k, v in out.items()}


def _host_components(shape: ModelShape, spec: RunSpec) -> dict[str, float]:
    p = spec.parallelism
    world = spec.world_size
    trainable = trainable_params(shape, spec)
    out: dict[str, float] = {}
    if p.cpu_offload:
        if spec.method.kind == "full":
            state = shape.total_params * trainable_bytes(spec.optim) / world
        else:
            state = shape.total_params * BF16 / world + trainable * trainable_bytes(spec.optim) / world
        out["offloaded states (pinned)"] = state * p.gpus_per_node
    # Loading: one copy of the model per node while it is sharded out to the ranks: bf16, or with the
    # mxfp4 base the experts as published (4-bit + scales), never dequantised on the host.
    if spec.model.base_format == "mxfp4" and spec.method.kind == "lora":
        experts = shape.expert_params_total
        out["weight loading (one copy, MXFP4 experts)"] = experts * MXFP4_BYTES_PER_EXPERT_PARAM + (shape.total_params - experts) * BF16
    else:
        out["weight loading (one bf16 copy)"] = shape.total_params * BF16
    if spec.checkpoint.async_save:
        out["async checkpoint staging"] = checkpoint_bytes(shape, spec) / p.nodes
    out["processes"] = HOST_PER_PROCESS_GIB * GiB * p.gpus_per_node
    return {k: v / GiB for k, v in out.items()}


def host_capacity_gib(spec: RunSpec) -> float:
    c = spec.cluster
    if c.host_memory_gib is not None:
        return c.host_memory_gib
    return gpu_info(spec).host_gib_per_gpu * spec.parallelism.gpus_per_node


def allocator_overhead(spec: RunSpec) -> float:
    """Reserved / allocated at the peak for this kind of run (see the constants)."""
    if spec.parallelism.cpu_offload:
        return ALLOCATOR_OVERHEAD_OFFLOAD
    if spec.method.kind == "full" and spec.world_size > 1:
        return ALLOCATOR_OVERHEAD_SHARDED_FULL
    return ALLOCATOR_OVERHEAD


def recompute_on(spec: RunSpec, shape: ModelShape | None = None) -> bool:
    """Whether decoder layers are recomputed in backward. ``auto`` keeps every activation when the plan
    without recomputation fits (a third fewer FLOPs per token for LoRA), and recomputes otherwise."""
    ac = spec.parallelism.activation_checkpointing
    if ac != "auto":
        return bool(ac)
    return not memory_plan(_with(spec, parallelism__activation_checkpointing=False), shape, suggest=False).fits


def settings_of(spec: RunSpec, shape: ModelShape | None = None) -> dict[str, Any]:
    p = spec.parallelism
    return {
        "model": spec.model.name, "method": spec.method.kind, "nodes": p.nodes, "gpus_per_node": p.gpus_per_node,
        "micro_batch_size": spec.optim.micro_batch_size, "max_seq_len": spec.data.max_seq_len,
        "activation_checkpointing": (f"auto ({'on' if recompute_on(spec, shape) else 'off'})"
                                     if p.activation_checkpointing == "auto" else p.activation_checkpointing),
        "cpu_offload": p.cpu_offload, "optimizer": label(spec.optim),
        "reshard_after_forward": p.reshard_after_forward, "attention": spec.kernels.attention,
        "loss_chunk_tokens": spec.kernels.loss_chunk_tokens,
        "lora_r": spec.method.lora.r if spec.method.kind == "lora" else None,
    }


def memory_plan(spec: RunSpec, shape: ModelShape | None = None, *, suggest: bool = True) -> MemoryPlan:
    """GPU and host memory for ``spec``; never raises for a plan that does not fit (see check_fit)."""
    shape = resolve_shape(spec, shape)
    gpu = gpu_info(spec)
    comps = _gpu_components(shape, spec)
    reserved = sum(comps.values()) * allocator_overhead(spec)
    total = reserved + CUDA_CONTEXT_GIB + (NCCL_GIB if spec.world_size > 1 else 0.0)
    cap = gpu.memory_gib * GPU_HEADROOM
    host = _host_components(shape, spec)
    host_total = sum(host.values())
    host_cap = host_capacity_gib(spec) * HOST_HEADROOM
    problems = []
    if total > cap:
        top = max(comps, key=comps.get)
        problems.append(f"needs {total:.1f} GiB per GPU but {cap:.1f} GiB is usable (largest: {top} {comps[top]:.1f} GiB)")
    if host_total > host_cap:
        problems.append(f"needs {host_total:.0f} GiB host memory per node but {host_cap:.0f} GiB is usable")
    plan = MemoryPlan(
        model=shape.name, method=spec.method.kind, nodes=spec.parallelism.nodes,
        gpus_per_node=spec.parallelism.gpus_per_node, gpu_type=spec.cluster.gpu_type,
        gpu={k: round(v, 3) for k, v in comps.items()}, gpu_reserved_gib=round(reserved, 2),
        gpu_total_gib=round(total, 2), gpu_capacity_gib=round(cap, 2),
        host={k: round(v, 2) for k, v in host.items()}, host_total_gib=round(host_total, 1),
        host_capacity_gib=round(host_cap, 1), fits=not problems, problems=problems, settings=settings_of(spec, shape),
    )
    if problems and suggest:
        plan.suggestions = suggestions(spec, shape)
    return plan


def with_settings(spec: RunSpec, **dotted: Any) -> RunSpec:
    """``spec`` with ``section__field=value`` settings replaced (validated again)."""
    return _with(spec, **dotted)


def _with(spec: RunSpec, **dotted: Any) -> RunSpec:
    # Only what was set travels: a dumped default would count as set (cluster.gpu_memory_gib's 80 GiB
    # would then override an H200's 141).
    data = spec.model_dump(exclude_unset=True)
    for key, value in dotted.items():
        section, name = key.split("__")
        data.setdefault(section, {})[name] = value
    return RunSpec.model_validate(data)


def suggestions(spec: RunSpec, shape: ModelShape, max_nodes: int = 64) -> list[str]:
    """Concrete settings that would make ``spec`` fit, each with the GPU figure it gives."""
    out: list[str] = []

    def fits(candidate: RunSpec) -> MemoryPlan | None:
        mp = memory_plan(candidate, shape, suggest=False)
        return mp if mp.fits else None

    def say(setting: str, mp: MemoryPlan) -> None:
        out.append(f"{setting} ({mp.gpu_total_gib:.1f} GiB/GPU, {mp.host_total_gib:.0f} GiB host/node)")

    p = spec.parallelism
    if p.activation_checkpointing is False and (mp := fits(_with(spec, parallelism__activation_checkpointing=True))):
        say("parallelism.activation_checkpointing: true", mp)
    if spec.kernels.attention == "eager" and (mp := fits(_with(spec, kernels__attention="auto"))):
        say("kernels.attention: auto (fused attention)", mp)
    if not p.cpu_offload and (mp := fits(_with(spec, parallelism__cpu_offload=True))):
        say("parallelism.cpu_offload: true", mp)
    for nodes in range(p.nodes + 1, max_nodes + 1):
        if mp := fits(_with(spec, parallelism__nodes=nodes)):
            say(f"--nodes {nodes} ({nodes * p.gpus_per_node} GPUs)", mp)
            break
    if spec.method.kind == "full" and (mp := fits(_with(spec, method__kind="lora"))):
        say("--method lora", mp)
    if spec.optim.micro_batch_size > 1:
        for mb in range(spec.optim.micro_batch_size - 1, 0, -1):
            if mp := fits(_with(spec, optim__micro_batch_size=mb)):
                say(f"optim.micro_batch_size: {mb} (raise optim.grad_accum to keep the batch)", mp)
                break
    seq = spec.data.max_seq_len // 2
    while seq >= 256:
        if mp := fits(_with(spec, data__max_seq_len=seq)):
            say(f"data.max_seq_len: {seq}", mp)
            break
        seq //= 2
    return out


def check_fit(spec: RunSpec, shape: ModelShape | None = None) -> MemoryPlan:
    """The memory plan of ``spec``; raises PlanError with the numbers and settings that would fit."""
    plan = memory_plan(spec, shape)
    if not plan.fits:
        hint = ("try: " + "; or ".join(plan.suggestions)) if plan.suggestions else (
            "no single change fits: use more or larger GPUs, LoRA, cpu_offload and a shorter max_seq_len together"
        )
        raise PlanError(f"run does not fit: {plan.summary()}", hint=hint + " (or --force to submit anyway)")
    return plan


# ---------------------------------------------------------------------------------- disk + store
def checkpoint_bytes(shape: ModelShape, spec: RunSpec) -> float:
    """One training checkpoint: the trainable master weights and Adam moments (+ small metadata)."""
    return trainable_params(shape, spec) * checkpoint_bytes_per_param(spec.optim) + 1e6


def merged_bytes(shape: ModelShape) -> float:
    return shape.total_params * BF16


def adapter_bytes(shape: ModelShape, spec: RunSpec) -> float:
    return lora_params(shape, spec) * FP32 if spec.method.kind == "lora" else 0.0


def base_weights_bytes(shape: ModelShape, spec: RunSpec) -> float:
    """What the per-node cache downloads: the published checkpoint (MXFP4 experts, bf16 rest)."""
    if spec.model.init == "random" or shape.name == "tiny":
        return 0.0
    experts = shape.expert_params_total
    return experts * MXFP4_BYTES_PER_EXPERT_PARAM + (shape.total_params - experts) * BF16


@dataclass
class DiskPlan:
    checkpoint_gb: float
    adapter_gb: float
    merged_gb: float
    base_weights_gb: float
    local_disk_per_node_gb: float      # node 0: cache + two checkpoint shards while writing + merge
    store_gb: float                    # keep_last checkpoints + merged + adapter
    local_disk_capacity_gb: float | None
    fits: bool


def disk_plan(spec: RunSpec, shape: ModelShape | None = None) -> DiskPlan:
    shape = resolve_shape(spec, shape)
    ckpt = checkpoint_bytes(shape, spec)
    merged = merged_bytes(shape) if spec.output.merge else 0.0
    adapter = adapter_bytes(shape, spec)
    base = base_weights_bytes(shape, spec)
    local = base + 2 * ckpt / spec.parallelism.nodes + merged
    store = spec.checkpoint.keep_last * ckpt + merged + adapter
    cap = spec.cluster.local_disk_gib
    cap_gb = cap * GiB / GB if cap is not None else None
    return DiskPlan(
        checkpoint_gb=round(ckpt / GB, 2), adapter_gb=round(adapter / GB, 3), merged_gb=round(merged / GB, 1),
        base_weights_gb=round(base / GB, 1), local_disk_per_node_gb=round(local / GB, 1), store_gb=round(store / GB, 1),
        local_disk_capacity_gb=round(cap_gb, 1) if cap_gb is not None else None,
        fits=cap_gb is None or local / GB <= cap_gb,
    )


# ---------------------------------------------------------------------------------- time + cost
def flops_per_token(shape: ModelShape, spec: RunSpec) -> float:
    """Training FLOPs per token actually executed (``flops.training_flops``; recomputation as resolved),
    for rows of one ``max_seq_len`` document (packing shorter documents lowers only the attention term)."""
    from gptoss_cloud.contract.plan.flops import training_flops

    return training_flops(shape, spec.method.kind, recompute_on(spec, shape), [spec.data.max_seq_len]).per_token


@dataclass
class TimePlan:
    mfu: float
    peak_tflops_per_gpu: float
    flops_per_token: float
    tokens_per_step: int
    step_time_s: float
    tokens_per_s: float
    steps: int | None
    train_tokens: float | None
    wall_time_h: float | None
    gpu_hours: float | None
    gpu_price_per_hour: float | None
    cost_usd: float | None
    note: str = ""


def time_plan(
    spec: RunSpec, shape: ModelShape | None = None, *, dataset_tokens: float | None = None,
    gpu_price: float | None = None, mfu: float | None = None,
) -> TimePlan:
    """Step time, wall time, GPU-hours and cost at an assumed MFU (stated in the result).

    Steps come from ``optim.max_steps``, else ``epochs x dataset_tokens / tokens_per_step`` when the
    dataset size is known; otherwise only rates are given.
    """
    shape = resolve_shape(spec, shape)
    mfu = ASSUMED_MFU if mfu is None else mfu
    if not 0 < mfu <= 1:
        raise PlanError(f"mfu must be in (0, 1], got {mfu}")
    peak = gpu_info(spec).bf16_tflops
    fpt = flops_per_token(shape, spec)
    world = spec.world_size
    tps = mfu * peak * 1e12 * world / fpt
    tokens_per_step = spec.optim.micro_batch_size * spec.data.max_seq_len * spec.optim.grad_accum * world
    step_time = tokens_per_step / tps
    steps: int | None = None
    note = ""
    if spec.optim.max_steps:
        steps = spec.optim.max_steps
    elif dataset_tokens and spec.optim.epochs:
        steps = max(1, math.ceil(spec.optim.epochs * dataset_tokens / tokens_per_step))
    else:
        note = "wall time unknown: set optim.max_steps or pass the dataset size (--tokens)"
    price = gpu_price if gpu_price is not None else spec.cluster.gpu_price_per_hour
    wall_h = steps * step_time / 3600 if steps else None
    gpu_h = wall_h * world if wall_h is not None else None
    cost = gpu_h * price if (gpu_h is not None and price is not None) else None
    return TimePlan(
        mfu=mfu, peak_tflops_per_gpu=peak, flops_per_token=fpt, tokens_per_step=tokens_per_step,
        step_time_s=round(step_time, 3), tokens_per_s=round(tps, 1), steps=steps,
        train_tokens=steps * tokens_per_step if steps else None,
        wall_time_h=round(wall_h, 3) if wall_h is not None else None,
        gpu_hours=round(gpu_h, 2) if gpu_h is not None else None, gpu_price_per_hour=price,
        cost_usd=round(cost, 2) if cost is not None else None, note=note,
    )


@dataclass
class RunPlan:
    memory: MemoryPlan
    disk: DiskPlan
    time: TimePlan
    params: dict[str, int]

    @property
    def fits(self) -> bool:
        return self.memory.fits and self.disk.fits

    def to_dict(self) -> dict:
        return {"fits": self.fits, "params": self.params, "memory": asdict(self.memory), "disk": asdict(self.disk), "time": asdict(self.time)}


@dataclass
class LongestSeq:
    tokens: int | None          # the longest data.max_seq_len that fits the GPUs (None: not even `step`)
    gpu_total_gib: float | None  # what the plan needs per GPU at that length
    gpu_capacity_gib: float
    recompute: bool | None       # whether layers are recomputed at that length
    step: int

    def to_dict(self) -> dict:
        return asdict(self)


def longest_seq(spec: RunSpec, shape: ModelShape | None = None, *, step: int = 1024, limit: int = MAX_SEQ_LEN) -> LongestSeq:
    """The longest ``data.max_seq_len`` (a multiple of ``step``, at most ``limit``) whose GPU memory plan
    fits, with everything else as the spec says (``activation_checkpointing: auto`` switches on as the
    sequence grows). A planner projection: measured long-context rows are in docs/benchmarks.md."""
    shape = resolve_shape(spec, shape)

    def plan_at(n: int) -> MemoryPlan:
        return memory_plan(_with(spec, data__max_seq_len=n * step), shape, suggest=False)

    def fits(n: int) -> bool:
        mp = plan_at(n)
        return mp.gpu_total_gib <= mp.gpu_capacity_gib

    cap = plan_at(1).gpu_capacity_gib
    if not fits(1):
        return LongestSeq(None, None, cap, None, step)
    # Memory grows with the length whether layers are recomputed or not, so "fits" flips once: bisect.
    lo, hi = 1, limit // step
    if fits(hi):
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    at = _with(spec, data__max_seq_len=lo * step)
    return LongestSeq(lo * step, plan_at(lo).gpu_total_gib, cap, recompute_on(at, shape), step)


def plan_run(
    spec: RunSpec, shape: ModelShape | None = None, *, dataset_tokens: float | None = None,
    gpu_price: float | None = None, mfu: float | None = None,
) -> RunPlan:
    """Everything ``gptoss-cloud plan`` shows. Pure; never raises for a plan that does not fit."""
    shape = resolve_shape(spec, shape)
    return RunPlan(
        memory=memory_plan(spec, shape),
        disk=disk_plan(spec, shape),
        time=time_plan(spec, shape, dataset_tokens=dataset_tokens, gpu_price=gpu_price, mfu=mfu),
        params={"total": shape.total_params, "active": shape.active_params, "trainable": trainable_params(shape, spec)},
    )
