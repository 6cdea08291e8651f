"""Build GPT-OSS (transformers' GptOssForCausalLM) for training: shape, kernels, weights, LoRA/full.

- Shapes come from ``gptoss_cloud.contract.shapes`` (presets) or the weights folder's config.json.
- Attention and expert implementations are transformers' own, chosen by ``spec.kernels``:
  on GPU flex attention (learned sinks, sliding windows and packed segments through one block mask)
  and grouped_mm experts; on CPU the eager implementations (the references).
- What is trained, and the packed batches it is fed, are in ``gptoss_cloud.trainer.causal_lm``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from gptoss_cloud.contract.shapes import ModelShape, shape_for, shape_from_config
from gptoss_cloud.contract.sections import KernelsSection, MethodSection, ModelSection

from gptoss_cloud.trainer.kernels import attention

log = logging.getLogger(__name__)

GiB = 1024**3
SMALL_BASE_BYTES = 1 * GiB  # random-init models below this (bf16) save their base weights in the run home
# flex: ours (kernels/attention.py: exact sink gradients); hf_flex: transformers' own flex path.
ATTENTION_IMPLS = {"eager": "eager", "flex": attention.NAME, "hf_flex": "flex_attention"}
EXPERTS_IMPLS = {"eager": "eager", "grouped_mm": "grouped_mm", "fused": "gptoss_fused"}  # spec name -> transformers'
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


# ------------------------------------------------------------------------------------------ kernels
def resolve_implementations(kernels: KernelsSection, device_type: str) -> tuple[str, str]:
    """(attention, experts) implementation names for transformers, from the spec and the device."""
    on_gpu = device_type == "cuda"
    attn = kernels.attention
    if attn == "auto":
        attn = "flex" if on_gpu else "eager"
    if attn != "eager" and not on_gpu:
        raise ValueError(f"kernels.attention: {attn} trains only on a CUDA GPU (torch's flex attention has no "
                         "backward on CPU); use 'eager' or 'auto' here")
    experts = kernels.experts
    if experts == "auto":
        experts = "fused" if on_gpu else "eager"
    if experts == "fused":
        from gptoss_cloud.trainer.kernels.experts import register

        register()  # transformers validates the name when the model is built
    return ATTENTION_IMPLS[attn], EXPERTS_IMPLS[experts]


def configure_experts_(model: nn.Module, kernels: KernelsSection) -> int:
    """Hand ``kernels.mxfp4_dequant`` and ``kernels.experts_compile`` to every experts module of ``model``
    (transformers' dense ``GptOssExperts`` and ``Mxfp4Experts``): the expert kernels read them there, at
    each call, instead of from anywhere global. ``kernels.moe_tile_tokens`` tiles the experts' call in
    each MoE block (``kernels.tiled_experts``). Returns how many experts modules were set."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts, GptOssMLP

    from gptoss_cloud.trainer.kernels.experts import COMPILE_ATTR, FUSED_IMPL
    from gptoss_cloud.trainer.kernels.experts_mxfp4 import Mxfp4Experts
    from gptoss_cloud.trainer.kernels.tiled_experts import tile_mlp_

    n = 0
    for mod in model.modules():
        if isinstance(mod, (GptOssExperts, Mxfp4Experts)):
            setattr(mod, COMPILE_ATTR, kernels.experts_compile)
            if isinstance(mod, Mxfp4Experts):
                mod.dequant = kernels.mxfp4_dequant
            n += 1
        elif isinstance(mod, GptOssMLP):
            tile = kernels.moe_tile_tokens
            experts = mod.experts
            if tile is not None and not isinstance(experts, Mxfp4Experts) and experts.config._experts_implementation != FUSED_IMPL:
                raise ValueError(f"kernels.moe_tile_tokens tiles the fused and MXFP4 experts, but these run "
                                 f"{experts.config._experts_implementation!r}: set kernels.experts: fused "
                                 "(or model.base_format: mxfp4), or leave moe_tile_tokens unset")
            tile_mlp_(mod, tile)
    return n


# ------------------------------------------------------------------------------------------- shapes
def is_random(model: ModelSection) -> bool:
    return model.init == "random" or model.name == "tiny"


def model_shape(model: ModelSection, config: dict | None = None) -> ModelShape:
    """The shape to build: a preset (random or published) or the given folder's config.json."""
    if config is not None and model.name not in ("tiny",):
        shape = shape_from_config(config, name=model.name)
        return shape.with_layers(model.layers) if model.layers else shape
    return shape_for(model.name, layers=model.layers)


def build_config(shape: ModelShape, attn_impl: str, experts_impl: str, router_aux_loss_coef: float | None = None):
    from transformers import GptOssConfig

    kw = shape.hf_config_dict()
    if router_aux_loss_coef is not None:
        kw["router_aux_loss_coef"] = router_aux_loss_coef
    for key in ("pad_token_id", "eos_token_id"):  # test shapes with a small vocabulary have no harmony ids
        if kw[key] >= shape.vocab_size:
            kw[key] = None
    config = GptOssConfig(**kw)
    config.use_cache = False
    if attn_impl == attention.NAME:
        attention.register()
    config._attn_implementation = attn_impl
    config._experts_implementation = experts_impl
    return config


def bf16_bytes(shape: ModelShape) -> int:
    return 2 * shape.total_params


def create_model(config, dtype: torch.dtype, device: str | torch.device = "cpu", seed: int | None = None,
                 base_format: str = "bf16"):
    """A GptOssForCausalLM with transformers' random init (``device='meta'``: no storage at all).

    With a seed, every rank builds bit-identical weights (the small-model path, where each rank
    materialises the whole model and FSDP keeps its shard). ``base_format='mxfp4'`` keeps the experts
    as frozen MXFP4 (``kernels.experts_mxfp4.Mxfp4Experts``): the model is built on the meta device,
    experts swapped for empty packed buffers, and (unless ``device='meta'``) materialised on ``device``
    and filled by ``init_sharded_weights_`` -- the dense bf16 experts never exist, so the build's peak
    memory is the MXFP4 model's.
    """
    from transformers import GptOssForCausalLM

    if base_format not in ("bf16", "mxfp4"):
        raise ValueError(f"model.base_format must be bf16 or mxfp4, got {base_format!r}")
    mxfp4 = base_format == "mxfp4"
    if seed is not None:
        torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta" if mxfp4 else device):
            model = GptOssForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    # The dtype the model computes in, recorded in the config each checkpoint carries: a full fine-tune
    # keeps fp32 master weights, but its merge is served in this dtype (bf16 on GPUs).
    model.config.dtype = dtype
    if mxfp4:
        from gptoss_cloud.trainer.kernels.experts_mxfp4 import quantize_model_experts_

        quantize_model_experts_(model)
        if str(device) != "meta":
            model.to_empty(device=device)
            init_sharded_weights_(model, config.initializer_range, seed if seed is not None else 0)
        return model
    # transformers keeps norms in fp32 only when asked at load; here everything is one dtype.
    return model.to(dtype) if str(device) != "meta" else model


def init_sharded_weights_(model: nn.Module, std: float, seed: int) -> None:
    """Random-initialise a model that was sharded on the meta device and then ``to_empty``'d.

    Each rank fills only its local shard (so 20b/120b never exist whole anywhere); values follow
    transformers' init for GPT-OSS (normal(0, std) matrices and sinks, zero biases, unit norms).
    """
    from torch.distributed.tensor import DTensor

    from gptoss_cloud.trainer.kernels.experts_mxfp4 import init_random_mxfp4_, mxfp4_experts_modules

    for i, (_, experts) in enumerate(mxfp4_experts_modules(model)):
        init_random_mxfp4_(experts, std, seed * 1009 + i)  # packed buffers: not parameters, filled here
    # Draw on each parameter's own device: drawing 20b's weights on the host would take minutes.
    gens: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            gen = gens.get(local.device)
            if gen is None:
                gen = gens[local.device] = torch.Generator(device=local.device).manual_seed(seed)
            leaf = name.rsplit(".", 1)[-1]
            if "lora_B" in name:
                local.zero_()  # an adapter starts as the identity
            elif "lora_A" in name:
                bound = 1.0 / math.sqrt(local.shape[-1]) if local.dim() > 1 else 0.0
                local.copy_(torch.rand(local.shape, generator=gen, dtype=torch.float32, device=local.device).mul_(2 * bound).sub_(bound))
            elif "norm" in name and leaf == "weight":
                local.fill_(1.0)
            elif leaf.endswith("bias") and "router" not in name:
                local.zero_()
            else:
                local.copy_(torch.randn(local.shape, generator=gen, dtype=torch.float32, device=local.device).mul_(std))
    reset_rotary_buffers_(model)


def reset_rotary_buffers_(model: nn.Module, device: torch.device | str | None = None) -> None:
    """Recompute the rotary inv_freq buffers (non-persistent: meta/to_empty leaves them garbage)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    for mod in model.modules():
        if isinstance(mod, GptOssRotaryEmbedding):
            with torch.device("cpu"):
                fresh = GptOssRotaryEmbedding(mod.config)
            for bname, buf in fresh.named_buffers():
                old = getattr(mod, bname)
                target = device if device is not None else (old.device if old.device.type != "meta" else "cpu")
                setattr(mod, bname, buf.to(target))
            mod.attention_scaling = fresh.attention_scaling


# -------------------------------------------------------------------------------------------- methods
def lora_config(method: MethodSection, num_layers: int):
    from peft import LoraConfig

    lo = method.lora
    params: list[str] = []
    if lo.experts:
        layers = lo.expert_layers if lo.expert_layers is not None else range(num_layers)
        for i in layers:
            if not 0 <= i < num_layers:
                raise ValueError(f"method.lora.expert_layers: layer {i} does not exist (the model has {num_layers})")
            params += [f"layers.{i}.mlp.experts.gate_up_proj", f"layers.{i}.mlp.experts.down_proj"]
    if lo.router:
        params.append("mlp.router.weight")
    return LoraConfig(
        r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=list(lo.target_modules),
        target_parameters=params or None, bias="none", task_type="CAUSAL_LM",
    )


def check_method_fits_base(model: nn.Module, method: MethodSection) -> None:
    """Frozen MXFP4 experts have no trainable weight: refuse the methods that would train them."""
    from gptoss_cloud.contract.errors import GptossError

    from gptoss_cloud.trainer.kernels.experts_mxfp4 import mxfp4_experts_modules

    if not mxfp4_experts_modules(model):
        return
    if method.kind == "full":
        raise GptossError("method.kind: full cannot train experts kept in MXFP4 (model.base_format: mxfp4)",
                          hint="use model.base_format: bf16 for full fine-tuning, or method.kind: lora")
    if method.lora.experts:
        raise GptossError("method.lora.experts cannot adapt experts kept in MXFP4 (model.base_format: mxfp4): "
                          "their weights are frozen packed buffers",
                          hint="set method.lora.experts: false (LoRA on attention and the router still works), "
                               "or use model.base_format: bf16")


def apply_method(model: nn.Module, method: MethodSection) -> nn.Module:
    """LoRA through peft (returns the PeftModel; base weights frozen) or full fine-tuning (all trainable);
    ``method.qat`` on top."""
    check_method_fits_base(model, method)
    if method.kind == "full":
        model.requires_grad_(True)
    else:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(method, model.config.num_hidden_layers))
    if method.qat == "mxfp4":
        enable_qat_(model)
    return model


def enable_qat_(model: nn.Module) -> str:
    """``method.qat: mxfp4``: the experts forward sees its expert matrices as the MXFP4 export will write
    them (after peft's LoRA delta), with straight-through gradients (kernels/qat.py), whichever experts
    implementation the config names. Returns the implementation's new name."""
    from gptoss_cloud.trainer.kernels.qat import qat_implementation

    config = hf_model(model).config
    config._experts_implementation = qat_implementation(config._experts_implementation)
    return config._experts_implementation


def recompute_ops() -> list:
    """What selective recomputation keeps: the outputs of the GEMMs (dense and grouped), the expensive
    part of a decoder layer's forward; norms, activations, routing and attention are recomputed."""
    aten = torch.ops.aten
    ops = [aten.mm.default, aten.addmm.default, aten.bmm.default]
    if hasattr(aten, "_grouped_mm"):
        ops.append(aten._grouped_mm.default)
    return ops


def resolve_recompute(spec, device: torch.device, shape: ModelShape | None = None) -> bool:
    """``parallelism.activation_checkpointing`` for this device: ``auto`` asks the planner, with this
    GPU's memory, whether the run fits without recomputation (then off: a third fewer FLOPs per token);
    CPU runs keep every activation (tiny models, host memory). ``parallelism.activation_offload`` offloads
    the checkpointed layer inputs, so with it ``auto`` means on."""
    ac = spec.parallelism.activation_checkpointing
    if ac != "auto":
        return bool(ac)
    if spec.parallelism.activation_offload:
        return True
    if device.type != "cuda":
        return False
    from gptoss_cloud.contract.plan.memory import recompute_on, with_settings

    gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    return recompute_on(with_settings(spec, cluster__gpu_memory_gib=round(gib, 1)), shape)


def enable_recompute(model: nn.Module, policy: str | bool) -> None:
    """Activation checkpointing per decoder layer (transformers' non-reentrant checkpointing).

    ``full`` (or True) recomputes each layer's forward in backward; ``selective`` recomputes all but
    the GEMM outputs (``recompute_ops``); ``none`` (or False) keeps every activation.
    """
    if policy in (False, "none"):
        return
    if policy not in (True, "full", "selective"):
        raise ValueError(f"recompute policy must be full, selective or none, got {policy!r}")
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if policy == "selective":
        from functools import partial

        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, recompute_ops())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def compile_enabled(kernels: KernelsSection, device_type: str) -> bool:
    """``kernels.compile``: auto compiles on GPU; CPU runs (tests, the local demo) stay eager."""
    return device_type == "cuda" if kernels.compile == "auto" else bool(kernels.compile)


def compile_layers(model: nn.Module, backend: str | None = None) -> int:
    """``torch.compile`` each decoder layer's ``forward`` (the region between FSDP2's hooks, which stay
    eager): norms, rotary, residual adds, routing and LoRA fuse into a few kernels around the GEMMs and
    attention. Layers of one kind share one compiled graph (parameters are graph inputs), so 24 or 36
    layers compile about twice. Returns the number of layers wrapped."""
    import torch._dynamo

    # Sliding and full-attention layers, forward and recompute: a few graphs; leave room for them all.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    layers = hf_model(model).model.layers
    for layer in layers:
        layer.forward = torch.compile(layer.forward, backend=backend or "inductor")
    return len(layers)


def hf_model(model: nn.Module) -> nn.Module:
    """The GptOssForCausalLM inside a PeftModel (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model
