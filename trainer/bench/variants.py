"""What the benchmark times: our training step and the transformers + peft reference, built fresh.

Both stacks get random weights at the real shape, the same random 1-row sequence every step,
gradient checkpointing (non-reentrant, per decoder layer), gradient clipping at 1.0 and AdamW
(fused on GPU). Each is what its users run:

* ours: the trainer's own pieces — ``model`` (CausalLMWithChunkedLoss: chunked linear +
  cross-entropy, full logits never materialised), ``parallel`` (accelerate's FSDP2 wrapping),
  ``loop`` (``make_optimizer`` and ``Loop.train_step``: packed-segment masks, the global
  trained-token count, clipping, the optimizer and scheduler step);
* reference: plain GptOssForCausalLM (+ peft LoRA r=16 on q/k/v/o), ``labels`` passed to the model
  so transformers computes full fp32 logits and its own loss, bf16 autocast on one GPU as the HF
  Trainer's ``bf16=True`` does; on several GPUs torch FSDP2 ``fully_shard`` per decoder layer and at
  the root, fp32 master weights, bf16 compute, fp32 gradient reduction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from gptoss_cloud.contract.shapes import ModelShape, shape_for

from gptoss_cloud.trainer.parallel import DistInfo

# The reference stack uses transformers' own implementations; ours maps spec names through the
# trainer's table (flex = our attention with exact sink gradients, fused = our expert GEMMs).
ATTENTION = {"eager": "eager", "flex": "flex_attention"}
EXPERTS = ("eager", "grouped_mm")
INIT_STD = 0.02


# What one variant may set beyond its kernels, overriding the benchmark's shared setup; lets a single
# invocation compare, e.g., recomputation policies or expert formats on the same card.
OVERRIDES = {
    "offload": (True, False),
    "base_format": ("bf16", "mxfp4"),
    "recompute": ("auto", "full", "none", "selective"),
    "dequant": ("auto", "torch", "triton", "gemm"),
    "compile": (True, False),
    "lora_experts": ("no", "all", "N+N+..."),  # LoRA on the experts of every layer / of the layers named
    "optim": ("adamw", "adamw_8bit"),  # optim.name
    "masters": ("fp32", "bf16"),  # optim.master_weights
    "act_offload": (True, False),  # parallelism.activation_offload (with recomputation)
    "moe_tile": ("N",),  # kernels.moe_tile_tokens: the experts over tiles of N tokens (0: off)
    "qat": ("none", "mxfp4"),  # method.qat
    "expert_units": ("N",),  # parallelism.expert_units: each layer's experts as N FSDP2 units
}


@dataclass(frozen=True)
class Variant:
    """One measured configuration."""

    name: str
    stack: str  # "ours" | "transformers"
    experts: str  # eager | grouped_mm
    attention: str  # eager | flex | hf_flex (ours) ; eager | flex (transformers)
    overrides: tuple = ()  # ((key, value), ...) with keys from OVERRIDES

    def to_dict(self) -> dict:
        return {"name": self.name, "stack": self.stack, "experts": self.experts, "attention": self.attention,
                "overrides": dict(self.overrides)}

    @classmethod
    def from_dict(cls, d: dict) -> "Variant":
        return cls(d["name"], d["stack"], d["experts"], d["attention"], tuple(sorted((d.get("overrides") or {}).items())))

    def apply(self, setup: "Setup") -> "Setup":
        """The setup this variant runs with (its overrides on top of the shared one)."""
        from dataclasses import replace

        return replace(setup, **dict(self.overrides)) if self.overrides else setup


@dataclass
class Setup:
    """What a variant is built from (serialisable: it crosses the process boundary as JSON)."""

    model: str = "20b"
    layers: int | None = None
    method: str = "lora"
    seq: int = 4096
    lora_r: int = 16
    loss_chunk_tokens: int = 1024
    offload: bool = False
    seed: int = 0
    base_format: str = "bf16"
    recompute: str = "auto"  # auto: as the trainer (planner decides); full; none; selective: GEMM outputs kept
    dequant: str = "auto"  # MXFP4 experts: auto (Triton when installed) | torch ops | the Triton kernel
    compile: bool | None = None  # torch.compile each decoder layer's forward (None: on GPU)
    lora_experts: str = "no"  # LoRA on experts too: "no", "all", or layer numbers joined by "+"
    optim: str = "adamw"  # optim.name of our stack (the reference keeps torch's fp32 AdamW)
    masters: str = "fp32"  # optim.master_weights of our stack
    act_offload: bool = False  # parallelism.activation_offload: checkpointed layer inputs in pinned host memory
    moe_tile: int = 0  # kernels.moe_tile_tokens (0: the whole sequence at once)
    qat: str = "none"  # method.qat of our stack: mxfp4 fake-quantises the trained experts in the forward
    expert_units: int = 1  # parallelism.expert_units (trainer/kernels/expert_units.py)

    def shape(self) -> ModelShape:
        return shape_for(self.model, layers=self.layers)


@dataclass
class Prepared:
    """A built variant: ``step()`` runs one optimizer step and returns its loss (float or 0-d tensor)."""

    step: Callable[[], "torch.Tensor | float"]
    trainable_params: int
    total_params: int
    tokens_per_step: int  # packed positions per rank per step
    recompute: str = "none"  # what ran: none | selective | full (the FLOP count follows it)
    keep: list = field(default_factory=list)  # objects to drop when the variant is done


# ------------------------------------------------------------------------------------------ devices
def join_process_group() -> DistInfo:
    """The trainer's own join: the rank torchrun started (NCCL on GPU, gloo on CPU) or one process."""
    from gptoss_cloud.trainer.parallel import init_distributed

    return init_distributed(timeout_s=900.0)


def compute_dtype(device: torch.device) -> torch.dtype:
    # GPUs compute in bf16; CPU runs (tests) in fp32, as the trainer does.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ------------------------------------------------------------------------------------------- build
def hf_config(shape: ModelShape, variant: Variant, device_type: str = "cuda"):
    from gptoss_cloud.contract.sections import KernelsSection

    from gptoss_cloud.trainer import model as M

    if variant.stack == "ours":
        attn, experts = M.resolve_implementations(
            KernelsSection(experts=variant.experts, attention=variant.attention), device_type)
        return M.build_config(shape, attn, experts)
    if variant.attention not in ATTENTION:
        raise ValueError(f"attention must be one of {sorted(ATTENTION)}, got {variant.attention!r}")
    if variant.experts not in EXPERTS:
        raise ValueError(f"experts must be one of {list(EXPERTS)}, got {variant.experts!r}")
    return M.build_config(shape, ATTENTION[variant.attention], variant.experts)


def lora_dict(setup: Setup) -> dict:
    """The run spec's ``method.lora`` for this setup (attention always; experts as ``lora_experts`` says)."""
    out = {"r": setup.lora_r, "alpha": 2 * setup.lora_r}
    if setup.lora_experts != "no":
        out["experts"] = True
        out["expert_layers"] = None if setup.lora_experts == "all" else [int(x) for x in setup.lora_experts.split("+")]
    return out


def method_section(setup: Setup):
    from gptoss_cloud.contract.sections import LoraSection, MethodSection

    return MethodSection(kind=setup.method, lora=LoraSection(**lora_dict(setup)), qat=setup.qat)


def plan_spec(setup: Setup, variant: Variant, gpus: int, gpu_type: str = "H100", gpu_memory_gib: float | None = None):
    """The RunSpec the planner sees for one variant (random weights at the shape, one row per GPU)."""
    from gptoss_cloud.contract.spec import RunSpec

    ac = {"full": True, "none": False, "selective": True}.get(setup.recompute, "auto")
    return RunSpec.model_validate({
        "model": {"name": setup.model, "init": "random", "layers": setup.layers, "base_format": setup.base_format},
        "data": {"max_seq_len": setup.seq},
        "method": {"kind": setup.method, "lora": lora_dict(setup), "qat": setup.qat},
        "optim": {"micro_batch_size": 1, "grad_accum": 1, "name": setup.optim, "master_weights": setup.masters},
        "parallelism": {"nodes": 1, "gpus_per_node": gpus, "cpu_offload": setup.offload, "activation_checkpointing": ac,
                        "activation_offload": setup.act_offload, "expert_units": setup.expert_units},
        "kernels": {"experts": variant.experts, "attention": "eager" if variant.attention == "eager" else "flex",
                    "loss_chunk_tokens": setup.loss_chunk_tokens, "compile": "auto" if setup.compile is None else setup.compile,
                    "moe_tile_tokens": setup.moe_tile or None},
        "cluster": {"gpu_type": gpu_type, **({"gpu_memory_gib": gpu_memory_gib} if gpu_memory_gib else {})},
    })


def recompute_policy(setup: Setup, variant: Variant, info: DistInfo) -> str:
    """``auto`` decided as the trainer decides it (the planner, for this card's memory); CPU: none."""
    if setup.recompute != "auto":
        return setup.recompute
    from gptoss_cloud.trainer import model as M

    return "full" if M.resolve_recompute(plan_spec(setup, variant, info.world_size), info.device) else "none"


def long_context_problem(recompute: str, act_offload: bool, moe_tile: int) -> str | None:
    """Why ``act_offload`` / ``moe_tile`` cannot run with this recomputation policy (None: they can)."""
    if recompute == "selective" and (act_offload or moe_tile):
        return "act_offload and moe_tile need recompute full or auto (selective keeps the GEMM outputs they exist to drop)"
    if recompute == "none" and act_offload:
        return "act_offload offloads the checkpointed layer inputs: it needs recompute full or auto"
    return None


def random_fill_(module: nn.Module, seed: int) -> None:
    """Random weights for a model materialised with ``to_empty`` (each rank its own shard), drawn on
    the device: the values do not matter for timing, and drawing 20b on the host takes minutes."""
    from torch.distributed.tensor import DTensor

    gen = None
    with torch.no_grad():
        for name, p in module.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            if gen is None:
                gen = torch.Generator(device=local.device).manual_seed(seed)
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name and leaf == "weight":
                local.fill_(1.0)
            else:
                local.normal_(0.0, INIT_STD, generator=gen)


def random_batch(shape: ModelShape, seq: int, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, shape.vocab_size, (1, seq), generator=gen).to(device)


def _optimizer(params: list[nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")


def _fsdp2(module: nn.Module, layers: list[nn.Module], info: DistInfo, offload: bool) -> None:
    """fully_shard each decoder layer, then the root (embedding, head and what is left)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kw: dict = {}
    if info.device.type == "cuda":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=info.device.type == "cuda")
    for layer in layers:
        fully_shard(layer, **kw)
    fully_shard(module, **kw)


def _materialise(module: nn.Module, info: DistInfo, seed: int, offload: bool) -> None:
    from gptoss_cloud.trainer import model as M

    module.to_empty(device="cpu" if offload else info.device)
    random_fill_(module, seed + info.rank)
    M.reset_rotary_buffers_(module)
    if offload:
        # FSDP2 offloads parameters only; buffers (rotary frequencies) must live where compute runs.
        for mod in module.modules():
            for name, buf in list(mod.named_buffers(recurse=False)):
                setattr(mod, name, buf.to(info.device))


def _counts(module: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    return trainable, total


def _clip(params: list[nn.Parameter]) -> None:
    torch.nn.utils.clip_grad_norm_(params, 1.0)


@dataclass
class _Row:
    """One packed training row in the loop's PackedSample form (plain int lists)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    seq_lens: list[int]


def build_ours(setup: Setup, variant: Variant, info: DistInfo) -> Prepared:
    """The trainer's module, sharding, optimizer and loop step (see the module docstring).

    Mirrors ``train.build_module`` for random weights, except that the values are drawn on the
    device (``random_fill_``) rather than on the host, which would take minutes for 20b.
    """
    from gptoss_cloud.contract.sections import KernelsSection, OptimSection, ParallelismSection
    from gptoss_cloud.trainer import causal_lm as LM
    from gptoss_cloud.trainer import model as M
    from gptoss_cloud.trainer.kernels.expert_units import split_experts_
    from gptoss_cloud.trainer.loop import Loop, make_optimizer
    from gptoss_cloud.trainer.optim import master_dtype
    from gptoss_cloud.trainer.parallel import make_accelerator, shard_model

    shape = setup.shape()
    config = hf_config(shape, variant, info.device.type)
    dtype = compute_dtype(info.device)
    sharded = info.distributed
    hf = M.create_model(config, dtype, "meta" if sharded else info.device, seed=setup.seed, base_format=setup.base_format)
    recompute = recompute_policy(setup, variant, info)
    if problem := long_context_problem(recompute, setup.act_offload, setup.moe_tile):
        raise ValueError(problem)
    # gemm: decoded inside the grouped GEMM; moe_tile: the experts over token tiles (tiled_experts.py)
    M.configure_experts_(hf, KernelsSection(mxfp4_dequant=setup.dequant, moe_tile_tokens=setup.moe_tile or None))
    split_experts_(hf, setup.expert_units)
    M.enable_recompute(hf, recompute)
    lm = M.apply_method(hf, method_section(setup))
    if info.device.type == "cuda" if setup.compile is None else setup.compile:
        M.compile_layers(lm)
    module = LM.CausalLMWithChunkedLoss(lm, setup.loss_chunk_tokens, activation_offload=setup.act_offload)
    optim = OptimSection(lr=1e-5, warmup_steps=0, schedule="constant", max_grad_norm=1.0, max_steps=1_000_000,
                         micro_batch_size=1, grad_accum=1, seed=setup.seed, name=setup.optim,
                         master_weights=setup.masters)
    masters = master_dtype(optim)
    if sharded:
        for p in module.parameters():
            if p.requires_grad and p.dtype != masters:
                p.data = p.data.to(masters)
        par = ParallelismSection(gpus_per_node=info.world_size, cpu_offload=setup.offload, expert_units=setup.expert_units)
        acc = make_accelerator(par, info, bf16=info.device.type == "cuda" and dtype == torch.bfloat16,
                               bf16_masters=masters == torch.bfloat16)
        module = shard_model(module, acc)
        _materialise(module, info, setup.seed, setup.offload)
    else:
        # Trainable weights in the master dtype (bf16 autocast computes); frozen ones stay in the base dtype.
        for p in module.parameters():
            if p.requires_grad and p.dtype != masters:
                p.data = p.data.to(masters)
    M.reset_rotary_buffers_(module)
    optimizer = make_optimizer([p for p in module.parameters() if p.requires_grad], optim, info.device)
    ids = random_batch(shape, setup.seq, setup.seed, torch.device("cpu"))[0].tolist()
    row = _Row(ids, ids, list(range(setup.seq)), [setup.seq])
    loop = Loop(module=module, config=config, optimizer=optimizer, optim=optim, info=info,
                samples=[row] * info.world_size, compute_dtype=dtype, shuffle=False, steps=optim.max_steps,
                autocast=info.device.type == "cuda" and not sharded and dtype == torch.bfloat16)

    def step() -> float:
        return loop.train_step().loss

    trainable, total = _counts(module)
    return Prepared(step, trainable, total, setup.seq, recompute=recompute, keep=[module, optimizer, loop])


def build_reference(setup: Setup, variant: Variant, info: DistInfo) -> Prepared:
    """transformers GptOssForCausalLM + peft LoRA (or full), labels to the model (full logits)."""
    from transformers import GptOssForCausalLM

    shape = setup.shape()
    config = hf_config(shape, variant, info.device.type)
    dtype = compute_dtype(info.device)
    sharded = info.distributed
    torch.manual_seed(setup.seed)
    init_dtype = torch.float32 if sharded else dtype
    prev = torch.get_default_dtype()
    torch.set_default_dtype(init_dtype)
    try:
        with torch.device("meta" if sharded else info.device):
            model = GptOssForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    if setup.recompute != "none":  # the reference recomputes unless told not to (what its users run)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if setup.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=setup.lora_r, lora_alpha=2 * setup.lora_r, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM",
        ))
    else:
        model.requires_grad_(True)
    if sharded:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssDecoderLayer

        _fsdp2(model, [m for m in model.modules() if isinstance(m, GptOssDecoderLayer)], info, setup.offload)
        _materialise(model, info, setup.seed, setup.offload)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(params, info.device)
    ids = random_batch(shape, setup.seq, setup.seed, info.device)
    autocast = info.device.type == "cuda" and not sharded

    def step() -> torch.Tensor:
        with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        _clip(params)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    trainable, total = _counts(model)
    return Prepared(step, trainable, total, setup.seq, recompute="none" if setup.recompute == "none" else "full",
                    keep=[model, opt])


BUILDERS: dict[str, Callable[[Setup, Variant, DistInfo], Prepared]] = {"ours": build_ours, "transformers": build_reference}


def build(setup: Setup, variant: Variant, info: DistInfo) -> Prepared:
    setup = variant.apply(setup)
    if setup.offload:
        from gptoss_cloud.trainer.parallel import offload_host_threads

        offload_host_threads(info)
    return BUILDERS[variant.stack](setup, variant, info)
