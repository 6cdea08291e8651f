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

from dataclasses import asdict, dataclass, field
from typing import Any

from gptoss_cloud.contract.errors import PlanError
# The activation terms and their constants (BACKWARD_LAYER_FACTOR, COMPILED_*_FACTOR, ...) live there.
from gptoss_cloud.contract.plan.activations import (
    activation_components, eager_attention_bytes, long_context_settings, offloaded_host_bytes,
)
from gptoss_cloud.contract.plan.disk import checkpoint_bytes
from gptoss_cloud.contract.plan.gpus import host_capacity_gib, gpu_info
from gptoss_cloud.contract.plan.optim_bytes import label, trainable_bytes
from gptoss_cloud.contract.plan.sizes import BF16, FP32, GiB, MXFP4_BYTES_PER_EXPERT_PARAM, resolve_shape, trainable_params
from gptoss_cloud.contract.shapes import ModelShape
from gptoss_cloud.contract.spec import RunSpec


# ---- assumptions (calibrate against docs/benchmarks.md) -------------------------------------
LOGITS_BYTES_PER_ELEM = BF16 + FP32 + FP32  # chunk logits, fp32 upcast for the loss, fp32 gradient
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
CUDA_CONTEXT_GIB = 0.6                     # CUDA context + cuBLAS workspaces, outside torch's reserved memory
NCCL_GIB = 1.0                             # NCCL communicator buffers when world > 1
GPU_HEADROOM = 0.95                        # plan to use at most this fraction of a GPU's memory
HOST_PER_PROCESS_GIB = 8.0                 # python, CUDA host state, dataloader per GPU process
HOST_HEADROOM = 0.9
ASSUMED_MFU = 0.25                         # achieved / peak bf16 FLOPs, recompute included (transformers+peft measured ~0.18)


# ---------------------------------------------------------------------------------- parameters


# ---------------------------------------------------------------------------------- activations
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
    units = p.expert_units
    if units > 1:
        # A layer is its attention/router/norms unit plus `units` expert units, called one after the other
        # inside it: the layer's own unit, the running expert unit and the prefetched next one are gathered
        # at once, and a gradient buffer is the biggest unit's (trainer/kernels/expert_units.py).
        experts_layer = shape.num_local_experts * shape.expert_params
        unit, rest = experts_layer / units, shape.layer_params - experts_layer
        biggest = max(unit, rest, shape.embedding_params)
    if offload:
        const, per_rank = OFFLOAD_FULL_UNIT_BYTES if full else OFFLOAD_LORA_UNIT_BYTES
        out["offload copy buffers (root unit + a layer)"] = (root + shape.layer_params) * (const + per_rank / world)
    elif world > 1:
        if p.reshard_after_forward and units > 1:
            out[f"all-gather buffers (a layer's own unit + 2 of {units} expert units, bf16)"] = \
                max(rest + 2 * unit, 2 * shape.embedding_params) * BF16
            out["root unit kept gathered (embedding + head, bf16)"] = root * BF16
        elif p.reshard_after_forward:
            out["all-gather buffers (2 layers, bf16)"] = 2 * biggest * BF16
            # FSDP2 does not reshard the root after forward (backward needs it at once): the embedding
            # and head stay gathered through the step, beside the layers' buffers.
            out["root unit kept gathered (embedding + head, bf16)"] = root * BF16
        else:
            out["unsharded weights (no reshard, bf16)"] = shape.total_params * BF16
    if full and not offload:
        what = "layer" if units == 1 else "unit"
        out[f"{what} gradient buffers (bf16 + fp32 reduce)"] = biggest * (BF16 + FP32)

    out.update(activation_components(shape, spec, recompute_on(spec, shape), compiled_layers(spec)))
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
    if p.activation_offload:
        out["offloaded activations (pinned, layer inputs + head)"] = offloaded_host_bytes(shape, spec) * p.gpus_per_node
    if spec.checkpoint.async_save:
        out["async checkpoint staging"] = checkpoint_bytes(shape, spec) / p.nodes
    out["processes"] = HOST_PER_PROCESS_GIB * GiB * p.gpus_per_node
    return {k: v / GiB for k, v in out.items()}


def allocator_overhead(spec: RunSpec) -> float:
    """Reserved / allocated at the peak for this kind of run (see the constants)."""
    if spec.parallelism.cpu_offload:
        return ALLOCATOR_OVERHEAD_OFFLOAD
    if spec.method.kind == "full" and spec.world_size > 1:
        return ALLOCATOR_OVERHEAD_SHARDED_FULL
    return ALLOCATOR_OVERHEAD


def expert_units_option(spec: RunSpec, shape: ModelShape) -> int | None:
    """The expert split worth trying for ``spec`` (None: none applies): sharded full fine-tuning without
    offload, where a layer's gather and gradient buffers are the transient peak. The fewest units (a power
    of two dividing the experts) at which no expert unit is bigger than the embedding, FSDP2's other big
    unit: more would shrink nothing that sets the peak."""
    p = spec.parallelism
    if spec.method.kind != "full" or p.cpu_offload or spec.world_size < 2 or p.expert_units != 1:
        return None
    experts_layer = shape.num_local_experts * shape.expert_params
    units = 2
    while units < shape.num_local_experts and experts_layer / units > shape.embedding_params:
        units *= 2
    if shape.num_local_experts % units:
        return None
    try:  # what the split does not combine with is RunSpec's rule (spec.py: _expert_units_on_dense_experts)
        _with(spec, parallelism__expert_units=units)
    except ValueError:
        return None
    return units


def recompute_on(spec: RunSpec, shape: ModelShape | None = None) -> bool:
    """Whether decoder layers are recomputed in backward. ``auto`` keeps every activation when the plan
    without recomputation fits (a third fewer FLOPs per token for LoRA), and recomputes otherwise."""
    ac = spec.parallelism.activation_checkpointing
    if ac != "auto":
        return bool(ac)
    if spec.parallelism.activation_offload:  # what it offloads are the checkpointed layer inputs
        return True
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
        "activation_offload": p.activation_offload, "moe_tile_tokens": spec.kernels.moe_tile_tokens,
        "expert_units": p.expert_units,
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
    if (units := expert_units_option(spec, shape)) and (mp := fits(_with(spec, parallelism__expert_units=units))):
        say(f"parallelism.expert_units: {units}", mp)
    if not p.cpu_offload and (mp := fits(_with(spec, parallelism__cpu_offload=True))):
        say("parallelism.cpu_offload: true", mp)
    # Long sequences: the layer inputs to the host, the experts over token tiles (docs/long-context.md).
    for key, value in long_context_settings(spec).items():
        if mp := fits(_with(spec, **{key: value})):
            say(f"{key.replace('__', '.')}: {str(value).lower()}", mp)
    if len(both := long_context_settings(spec)) == 2 and (mp := fits(_with(spec, **both))):
        say(" + ".join(f"{k.replace('__', '.')}: {str(v).lower()}" for k, v in both.items()), mp)
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


# ---------------------------------------------------------------------------------- time + cost


