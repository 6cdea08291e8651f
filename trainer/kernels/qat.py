"""Quantisation-aware training of the experts (``method.qat: mxfp4``): train them as they will be served.

The MXFP4 export writes every expert matrix as ``quantize_expert_weight(W)``, W being the weight it
exports: the parameter of a full fine-tune, or base + LoRA delta for LoRA on the experts. Here the
forward sees exactly ``dequantize_expert_weight(*quantize_expert_weight(W))`` instead of W, and the
backward passes the gradient through unchanged (straight-through estimator): the gradient w.r.t. W is
the ordinary gradient evaluated at the quantised weight. Biases stay as they are (the release keeps
them in bf16).

``fake_quantize_mxfp4`` computes those values in one pass over the weight, without packing codes:
per group of 32 along the input dimension (the checkpoint's last axis is transformers' ``in``), the
scale 2^e of ``quantize_mxfp4``, then each value rounds to the e2m1 grid (0, .5, 1, 1.5, 2, 3, 4, 6) by
``torch.round`` (half to even) on the value divided by its grid step, a power of two; ties to the even
mantissa are ``quantize_mxfp4``'s ties to the even code. Every step is exact in fp32, so the result is
bit for bit the quantise-dequantise round trip (tests/unit/test_qat.py). On a GPU it is one compiled
kernel (``kernels.experts_compile``), reading W once and writing the quantised copy once.

How the experts kernels see it: ``qat_implementation`` registers, beside each experts implementation
(eager, grouped_mm, fused), one that reads the module's two matrices, fake-quantises them, and calls
the same kernel on an ``ExpertsView`` carrying them; ``model.enable_qat_`` points the model's config
at it. The matrices are read where the kernel would read them, inside the experts forward: under
peft's LoRA on the experts that gives base + delta (peft's parametrization is active there), under
FSDP2 the unsharded weight of the layer being run. One quantisation per matrix per forward (again in
the recomputation, when activation checkpointing is on).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from gptoss_cloud.trainer.kernels.experts import COMPILE_ATTR
from gptoss_cloud.trainer.kernels.mxfp4 import FP4_MAX, GROUP, SCALE_BIAS

WEIGHTS = ("gate_up_proj", "down_proj")  # transformers' (E, in, out) expert matrices; biases are not quantised
GROUP_DIM = 1  # the input dimension of (E, in, out)
QAT_PREFIX = "mxfp4_qat+"  # registered experts implementations: mxfp4_qat+eager, +grouped_mm, +gptoss_fused


def fake_quantize_mxfp4(w: torch.Tensor, dim: int = GROUP_DIM) -> torch.Tensor:
    """MXFP4-rounded ``w`` (same shape and dtype), in groups of 32 along ``dim``; not differentiable.

    Equals ``dequantize_mxfp4(*quantize_mxfp4(w'))`` with ``w'`` = ``w`` moved so that ``dim`` is last,
    bit for bit (finite inputs): same scale, same rounding, and every product below is exact in fp32
    (the scaled values have at most 2 significant bits and the scales are powers of two >= 2^-128).
    """
    dim = dim % w.dim()
    if w.shape[dim] % GROUP:
        raise ValueError(f"MXFP4 groups {GROUP} values along dimension {dim}; got shape {tuple(w.shape)}")
    g = w.detach().float().unflatten(dim, (w.shape[dim] // GROUP, GROUP))
    amax = g.abs().amax(dim=dim + 1, keepdim=True)
    # The scale exponent of quantize_mxfp4: ceil(log2(amax / 6)) (frexp is exact), -127 for all-zero groups.
    mant, p = torch.frexp(amax / FP4_MAX)
    e = torch.where(mant == 0.5, p - 1, p)
    e = torch.where(amax > 0, e, torch.full_like(e, -SCALE_BIAS)).clamp(-SCALE_BIAS, SCALE_BIAS)
    m = torch.ldexp(g, -e)  # |m| <= 6
    # The e2m1 grid step at |m|: 0.5 below 2, then 1 up to 4, then 2 (exponent floor(log2|m|) - 1, at least -1).
    step = (torch.frexp(m)[1] - 2).clamp(min=-1)
    q = torch.ldexp(torch.round(torch.ldexp(m, -step)), step + e)
    return (q + 0.0).flatten(dim, dim + 1).to(w.dtype)  # + 0.0: -0.0 -> 0.0, as code 0 decodes


_COMPILED: dict[str, Callable] = {}


def _quantizer(w: torch.Tensor, compiled: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """On CUDA, compiled into one fused reduction + elementwise kernel (about 25 kernels eager); eager
    elsewhere, or when not ``compiled`` (``kernels.experts_compile: false``)."""
    if not w.is_cuda or not compiled:
        return fake_quantize_mxfp4
    if "fq" not in _COMPILED:
        _COMPILED["fq"] = torch.compile(fake_quantize_mxfp4, dynamic=False)
    return _COMPILED["fq"]


class _StraightThrough(torch.autograd.Function):
    """y = fake_quantize_mxfp4(w); dL/dw = dL/dy (saves nothing for backward)."""

    @staticmethod
    def forward(ctx, w, compiled: bool):
        return _quantizer(w, compiled)(w)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def fake_quantize_ste(w: torch.Tensor, compiled: bool = True) -> torch.Tensor:
    """``fake_quantize_mxfp4`` of an (E, in, out) expert weight with a straight-through gradient."""
    return _StraightThrough.apply(w, compiled)


class ExpertsView:
    """An experts module as its kernels read it, with other expert matrices in place of its own.

    The kernels (transformers' eager loop and grouped_mm, ``experts.fused_experts_forward``) take the
    module as ``self`` and read its attributes; this hands them the fake-quantised matrices and defers
    everything else (biases, sizes, ``_apply_gate``, the kernel settings) to the module. Nothing is
    mutated, so compiled layers see the same module every step."""

    def __init__(self, experts: nn.Module, gate_up_proj: torch.Tensor, down_proj: torch.Tensor):
        self._experts, self.gate_up_proj, self.down_proj = experts, gate_up_proj, down_proj

    def __getattr__(self, name: str):  # only what __init__ did not set
        return getattr(self._experts, name)


def export_dtype(config, default: torch.dtype) -> torch.dtype:
    """The dtype the MXFP4 export quantises from: the merged weight in the dtype the run computed in, which
    the model's config records (``config.dtype``; bf16 on GPUs, where a full fine-tune keeps fp32 masters).
    Rounding an fp32 master to bf16 first can move a value onto a rounding midpoint or a group's maximum
    across a power of two, so the quantisation starts from the same bf16 value the export will read."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else default


def qat_forward(inner: Callable) -> Callable:
    """An ``ExpertsInterface`` implementation: ``inner`` on the MXFP4-rounded expert matrices. The weights
    are read from the module as ``inner`` would read them: under peft's LoRA on the experts that is
    base + delta (peft's parametrization is active inside the forward), under FSDP2 the unsharded one."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        compiled = getattr(self, COMPILE_ATTR, True)
        weights = [getattr(self, name) for name in WEIGHTS]
        dtype = export_dtype(self.config, weights[0].dtype)
        view = ExpertsView(self, *(fake_quantize_ste(w.to(dtype), compiled) for w in weights))
        return inner(view, hidden_states, top_k_index, top_k_weights)

    return forward


def qat_implementation(experts_impl: str) -> str:
    """Register (once) and return the name of ``experts_impl`` with MXFP4 fake quantisation, for
    ``config._experts_implementation`` (transformers' experts dispatcher)."""
    from transformers.integrations.moe import ExpertsInterface
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    if experts_impl.startswith(QAT_PREFIX):
        return experts_impl
    name = QAT_PREFIX + experts_impl
    if name not in ExpertsInterface():
        eager = GptOssExperts.forward.__wrapped__  # transformers' loop, under its experts dispatcher
        inner = eager if experts_impl == "eager" else ExpertsInterface().get_interface(experts_impl, eager)
        ExpertsInterface.register(name, qat_forward(inner))
    return name
