"""What the benchmark times: our training step and the transformers + peft reference, built fresh.

Both stacks get random weights at the real shape, the same random 1-row packed sequence every
step, gradient checkpointing (non-reentrant, per decoder layer), gradient clipping at 1.0 and AdamW
(fused on GPU). They differ where our trainer differs:

* ours: the trainer's build (``gptoss_cloud.trainer.model``): CausalLMWithChunkedLoss (chunked
  linear + cross-entropy, full logits never materialised), packed-segment masks built every step as
  the loop does, trainable weights in fp32 under bf16 autocast on one GPU;
* reference: plain GptOssForCausalLM (+ peft LoRA on attention), ``labels`` passed to the model so
  transformers computes full fp32 logits and its own loss, bf16 autocast like the HF Trainer's
  ``bf16=True``.

On several GPUs (or with offload) both are sharded with torch FSDP2 ``fully_shard`` per decoder
layer and at the root, fp32 master weights, bf16 compute and fp32 gradient reduction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from gptoss_cloud.shapes import ModelShape, shape_for

ATTENTION = {"eager": "eager", "flex": "flex_attention", "sdpa": "sdpa"}
EXPERTS = ("eager", "grouped_mm")
INIT_STD = 0.02


@dataclass(frozen=True)
class Variant:
    """One measured configuration."""

    name: str
    stack: str  # "ours" | "transformers"
    experts: str  # eager | grouped_mm
    attention: str  # eager | flex | sdpa

    def to_dict(self) -> dict:
        return {"name": self.name, "stack": self.stack, "experts": self.experts, "attention": self.attention}

    @classmethod
    def from_dict(cls, d: dict) -> "Variant":
        return cls(d["name"], d["stack"], d["experts"], d["attention"])


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

    def shape(self) -> ModelShape:
        return shape_for(self.model, layers=self.layers)


@dataclass
class Prepared:
    """A built variant: ``step()`` runs one optimizer step and returns the loss (a 0-d tensor)."""

    step: Callable[[], torch.Tensor]
    trainable_params: int
    total_params: int
    tokens_per_step: int  # packed positions per rank per step
    keep: list = field(default_factory=list)  # objects to drop when the variant is done


# ------------------------------------------------------------------------------------------ devices
@dataclass(frozen=True)
class Rank:
    rank: int
    world: int
    device: torch.device

    @property
    def sharded(self) -> bool:
        return self.world > 1 or dist_initialized()


def dist_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def join_process_group(offload: bool) -> Rank:
    """The rank torchrun started (NCCL on GPU, gloo on CPU); a plain single process otherwise."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if (world > 1 or offload) and "MASTER_ADDR" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return Rank(rank, world, device)


def compute_dtype(device: torch.device) -> torch.dtype:
    # GPUs compute in bf16; CPU runs (tests) in fp32, as the trainer does.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ------------------------------------------------------------------------------------------- build
def hf_config(shape: ModelShape, variant: Variant):
    from . import model as M

    if variant.attention not in ATTENTION:
        raise ValueError(f"attention must be one of {sorted(ATTENTION)}, got {variant.attention!r}")
    if variant.experts not in EXPERTS:
        raise ValueError(f"experts must be one of {list(EXPERTS)}, got {variant.experts!r}")
    return M.build_config(shape, ATTENTION[variant.attention], variant.experts)


def method_section(setup: Setup):
    from gptoss_cloud.spec import LoraSection, MethodSection

    return MethodSection(kind=setup.method, lora=LoraSection(r=setup.lora_r, alpha=2 * setup.lora_r))


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


def _fsdp2(module: nn.Module, layers: list[nn.Module], rank: Rank, offload: bool) -> None:
    """fully_shard each decoder layer, then the root (embedding, head and what is left)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kw: dict = {}
    if rank.device.type == "cuda":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=rank.device.type == "cuda")
    for layer in layers:
        fully_shard(layer, **kw)
    fully_shard(module, **kw)


def _materialise(module: nn.Module, rank: Rank, seed: int, offload: bool) -> None:
    from . import model as M

    module.to_empty(device="cpu" if offload else rank.device)
    random_fill_(module, seed + rank.rank)
    M.reset_rotary_buffers_(module)


def _counts(module: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    return trainable, total


def _clip(params: list[nn.Parameter]) -> None:
    torch.nn.utils.clip_grad_norm_(params, 1.0)


def build_ours(setup: Setup, variant: Variant, rank: Rank) -> Prepared:
    """Our trainer's module and step (see the module docstring)."""
    from . import model as M
    from .kernels.loss import shift_packed_labels

    shape = setup.shape()
    config = hf_config(shape, variant)
    dtype = compute_dtype(rank.device)
    sharded = rank.sharded
    hf = M.create_model(config, torch.float32 if sharded else dtype, "meta" if sharded else rank.device, seed=setup.seed)
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm = M.apply_method(hf, method_section(setup))
    module = M.CausalLMWithChunkedLoss(lm, setup.loss_chunk_tokens)
    if sharded:
        _fsdp2(module, list(module.decoder.layers), rank, setup.offload)
        _materialise(module, rank, setup.seed, setup.offload)
    else:
        # Trainable weights in fp32 (bf16 autocast computes); frozen ones stay in the base dtype.
        for p in module.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = _optimizer(params, rank.device)
    ids = random_batch(shape, setup.seq, setup.seed, rank.device)
    seq_lens = [[setup.seq]]
    targets = shift_packed_labels(ids, seq_lens)
    batch = M.Batch(ids, targets, torch.arange(setup.seq, device=rank.device)[None], seq_lens)
    autocast = rank.device.type == "cuda" and not sharded and dtype == torch.bfloat16

    def step() -> torch.Tensor:
        with torch.autocast(rank.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss_sum, count, _ = M.run_batch(module, batch, config, dtype)
        loss = loss_sum / count
        loss.backward()
        _clip(params)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    trainable, total = _counts(module)
    return Prepared(step, trainable, total, setup.seq, keep=[module, opt])


def build_reference(setup: Setup, variant: Variant, rank: Rank) -> Prepared:
    """transformers GptOssForCausalLM + peft LoRA (or full), labels to the model (full logits)."""
    from transformers import GptOssForCausalLM

    shape = setup.shape()
    config = hf_config(shape, variant)
    dtype = compute_dtype(rank.device)
    sharded = rank.sharded
    torch.manual_seed(setup.seed)
    init_dtype = torch.float32 if sharded else dtype
    prev = torch.get_default_dtype()
    torch.set_default_dtype(init_dtype)
    try:
        with torch.device("meta" if sharded else rank.device):
            model = GptOssForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
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

        _fsdp2(model, [m for m in model.modules() if isinstance(m, GptOssDecoderLayer)], rank, setup.offload)
        _materialise(model, rank, setup.seed, setup.offload)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(params, rank.device)
    ids = random_batch(shape, setup.seq, setup.seed, rank.device)
    autocast = rank.device.type == "cuda" and not sharded

    def step() -> torch.Tensor:
        with torch.autocast(rank.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        _clip(params)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    trainable, total = _counts(model)
    return Prepared(step, trainable, total, setup.seq, keep=[model, opt])


BUILDERS: dict[str, Callable[[Setup, Variant, Rank], Prepared]] = {"ours": build_ours, "transformers": build_reference}


def build(setup: Setup, variant: Variant, rank: Rank) -> Prepared:
    return BUILDERS[variant.stack](setup, variant, rank)
