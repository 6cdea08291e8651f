"""Frozen GPT-OSS experts kept in their released MXFP4 form, dequantised inside the expert GEMMs.

``Mxfp4Experts`` replaces transformers' ``GptOssExperts``: the two expert matrices live as uint8
buffers in the checkpoint layout (``gate_up_proj_blocks/_scales``, ``down_proj_blocks/_scales``; 17/32
byte per weight), the biases as frozen parameters. Each GEMM dequantises a bounded number of experts
to the compute dtype, multiplies, and drops the dequantised copy; ``_Mxfp4GroupedLinear`` returns the
input gradient only and dequantises again in backward, so no bf16 expert weight outlives one GEMM.

The module loads from either form of a checkpoint: the released ``*_blocks``/``*_scales`` tensors as
they are, or dense (experts, in, out) tensors, which it quantises (exact for weights that came from
MXFP4, so a dequantised released checkpoint round-trips bit for bit).
"""

from __future__ import annotations

import torch
from torch import nn

from gptoss_cloud.trainer.kernels.experts import compute_dtype, experts_forward, grouped_mm
from gptoss_cloud.trainer.kernels.mxfp4 import GROUP, dequantize_mxfp4, quantize_expert_weight

# Experts dequantised at once. 20b (32 experts) does a layer's matrix in one piece with no host sync
# (gate_up: 1.06 GB of transient bf16); 120b (128) goes in 4 pieces with one host read of the offsets.
DEFAULT_EXPERTS_PER_CHUNK = 32
WEIGHTS = ("gate_up_proj", "down_proj")


def mxfp4_grouped_mm(x: torch.Tensor, offsets: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
                     transposed: bool, experts_per_chunk: int, dequant: str = "auto") -> torch.Tensor:
    """(S, K) rows sorted by expert times each expert's dequantised weight W_e (out, in) from ``blocks``:
    ``x @ W_e.T`` (``transposed``, the forward) or ``x @ W_e`` (the input gradient). ``dequant`` is
    ``kernels.mxfp4_dequant`` (gemm: decoded inside the GEMM on CUDA)."""
    num_experts = blocks.shape[0]
    if x.is_cuda and dequant == "gemm":
        from gptoss_cloud.trainer.kernels.mxfp4_gemm_triton import mxfp4_grouped_mm_triton  # decoded inside the GEMM; opt-in until measured

        return mxfp4_grouped_mm_triton(x, offsets, blocks, scales, transposed)
    if experts_per_chunk >= num_experts:
        w = dequantize_mxfp4(blocks, scales, x.dtype, impl=dequant)  # (E, out, in)
        return grouped_mm(x, w.transpose(1, 2) if transposed else w, offsets)
    bounds = [0] + offsets.tolist()  # one host read per call; only when experts come in chunks
    outs = []
    for e0 in range(0, num_experts, experts_per_chunk):
        e1 = min(e0 + experts_per_chunk, num_experts)
        start, end = bounds[e0], bounds[e1]
        if end == start:
            continue
        w = dequantize_mxfp4(blocks[e0:e1], scales[e0:e1], x.dtype, impl=dequant)
        outs.append(grouped_mm(x[start:end], w.transpose(1, 2) if transposed else w, offsets[e0:e1] - start))
        del w
    n = blocks.shape[1] if transposed else blocks.shape[2] * blocks.shape[3] * 2
    return torch.cat(outs) if outs else x.new_zeros(0, n)


class _Mxfp4GroupedLinear(torch.autograd.Function):
    """y = x @ W_e.T per expert group with W dequantised on the fly; gradient for x only.

    The packed weights ride on ``ctx`` as attributes, not ``save_for_backward``: they are module
    buffers (no copy either way), and saved-tensor hooks (activation offloading) must not move them.
    """

    @staticmethod
    def forward(ctx, x, offsets, blocks, scales, experts_per_chunk: int, dequant: str):
        ctx.save_for_backward(offsets)
        ctx.blocks, ctx.scales, ctx.chunk, ctx.dequant = blocks, scales, experts_per_chunk, dequant
        return mxfp4_grouped_mm(x, offsets, blocks, scales, True, experts_per_chunk, dequant)

    @staticmethod
    def backward(ctx, grad_y):
        (offsets,) = ctx.saved_tensors
        grad_x = mxfp4_grouped_mm(grad_y.contiguous(), offsets, ctx.blocks, ctx.scales, False, ctx.chunk, ctx.dequant)
        return grad_x, None, None, None, None, None


class Mxfp4Experts(nn.Module):
    """Drop-in for ``GptOssExperts`` (same call signature and math) with frozen MXFP4 expert matrices."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, alpha: float, limit: float,
                 bias_dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
                 experts_per_chunk: int = DEFAULT_EXPERTS_PER_CHUNK, dequant: str = "auto",
                 compile_activation: bool = True):
        super().__init__()
        for what, n in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
            if n % GROUP:
                raise ValueError(f"MXFP4 experts need {what} to be a multiple of {GROUP} (got {n})")
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.alpha, self.limit, self.experts_per_chunk = alpha, limit, experts_per_chunk
        # kernels.mxfp4_dequant and kernels.experts_compile (set again by model.configure_experts_).
        self.dequant, self.compile_activation = dequant, compile_activation
        e, h, i = num_experts, hidden_size, intermediate_size
        u8 = {"dtype": torch.uint8, "device": device}
        # Checkpoint layout: rows are output features, 32 input features per (16-byte block, scale).
        self.register_buffer("gate_up_proj_blocks", torch.zeros(e, 2 * i, h // GROUP, GROUP // 2, **u8))
        self.register_buffer("gate_up_proj_scales", torch.zeros(e, 2 * i, h // GROUP, **u8))
        self.register_buffer("down_proj_blocks", torch.zeros(e, h, i // GROUP, GROUP // 2, **u8))
        self.register_buffer("down_proj_scales", torch.zeros(e, h, i // GROUP, **u8))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(e, 2 * i, dtype=bias_dtype, device=device), requires_grad=False)
        self.down_proj_bias = nn.Parameter(torch.zeros(e, h, dtype=bias_dtype, device=device), requires_grad=False)

    @classmethod
    def from_config(cls, config, bias_dtype: torch.dtype = torch.bfloat16, device=None) -> "Mxfp4Experts":
        return cls(config.num_local_experts, config.hidden_size, config.intermediate_size,
                   config.swiglu_alpha, config.swiglu_limit, bias_dtype, device)

    @classmethod
    def from_dense(cls, experts: nn.Module) -> "Mxfp4Experts":
        """Quantise a transformers ``GptOssExperts`` (weights (E, in, out)); biases are copied as they are."""
        w1 = experts.gate_up_proj
        dev = None if w1.device.type == "meta" else w1.device
        new = cls(experts.num_experts, experts.hidden_size, experts.intermediate_size, experts.alpha, experts.limit,
                  experts.gate_up_proj_bias.dtype, w1.device)
        if dev is not None:
            with torch.no_grad():
                new.set_dense_weights(experts.gate_up_proj, experts.down_proj)
                new.gate_up_proj_bias.copy_(experts.gate_up_proj_bias)
                new.down_proj_bias.copy_(experts.down_proj_bias)
        return new

    @torch.no_grad()
    def set_dense_weights(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> None:
        """Quantise dense (E, in, out) weights into the buffers, one expert at a time (bounded scratch)."""
        for name, w in zip(WEIGHTS, (gate_up_proj, down_proj)):
            blocks, scales = getattr(self, f"{name}_blocks"), getattr(self, f"{name}_scales")
            if tuple(w.shape) != (blocks.shape[0], blocks.shape[2] * GROUP, blocks.shape[1]):
                raise ValueError(f"{name}: dense weight {tuple(w.shape)} does not fit MXFP4 blocks {tuple(blocks.shape)}")
            for e in range(w.shape[0]):
                b, s = quantize_expert_weight(w[e:e + 1].to(blocks.device))
                blocks[e:e + 1].copy_(b)
                scales[e:e + 1].copy_(s)

    def dense_weight(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantised (E, in, out) weight (tests, export); the forward never builds it whole."""
        return dequantize_mxfp4(getattr(self, f"{name}_blocks"), getattr(self, f"{name}_scales"), dtype).transpose(1, 2)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Dense expert tensors (a bf16 checkpoint, or weights.py's dequantised read of a released one)
        # are quantised here so both checkpoint forms load into this module.
        for name in WEIGHTS:
            dense = state_dict.pop(prefix + name, None)
            if dense is not None:
                if prefix + f"{name}_blocks" in state_dict:
                    raise ValueError(f"{prefix}{name}: checkpoint holds both dense and MXFP4 forms")
                parts = [quantize_expert_weight(dense[e:e + 1]) for e in range(dense.shape[0])]  # bounded scratch
                blocks, scales = torch.cat([b for b, _ in parts]), torch.cat([s for _, s in parts])
                state_dict[prefix + f"{name}_blocks"], state_dict[prefix + f"{name}_scales"] = blocks, scales
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, hidden_states: torch.Tensor, router_indices: torch.Tensor, routing_weights: torch.Tensor):
        dtype = compute_dtype(hidden_states, hidden_states.dtype)
        chunk, dequant = self.experts_per_chunk, self.dequant

        def up(x, offs):
            return _Mxfp4GroupedLinear.apply(x, offs, self.gate_up_proj_blocks, self.gate_up_proj_scales, chunk, dequant)

        def down(x, offs):
            return _Mxfp4GroupedLinear.apply(x, offs, self.down_proj_blocks, self.down_proj_scales, chunk, dequant)

        return experts_forward(hidden_states, router_indices, routing_weights, self.num_experts, up, down,
                               self.gate_up_proj_bias, self.down_proj_bias, self.alpha, self.limit, dtype,
                               compile_activation=self.compile_activation)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"format=mxfp4, experts_per_chunk={self.experts_per_chunk}, dequant={self.dequant}")


# ------------------------------------------------------------------------------------------ model level
def mxfp4_experts_modules(model: nn.Module) -> list[tuple[str, Mxfp4Experts]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Mxfp4Experts)]


def quantize_model_experts_(model: nn.Module) -> int:
    """Replace every ``GptOssExperts`` in ``model`` with ``Mxfp4Experts`` (quantising real weights; on the
    meta device only the empty buffers are made). Returns how many were replaced."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, GptOssExperts)]
    for name, experts in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Mxfp4Experts.from_dense(experts))
        del experts
    return len(targets)


@torch.no_grad()
def init_random_mxfp4_(module: Mxfp4Experts, std: float, seed: int) -> None:
    """Random normal(0, std) expert weights quantised to MXFP4 (benchmarks, memory runs), generated expert
    by expert on the buffers' device; zero biases (transformers' init for GPT-OSS)."""
    dev = module.gate_up_proj_blocks.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    for name in WEIGHTS:
        blocks, scales = getattr(module, f"{name}_blocks"), getattr(module, f"{name}_scales")
        rows, cols = blocks.shape[1], blocks.shape[2] * GROUP
        for e in range(blocks.shape[0]):
            w = torch.randn(1, cols, rows, generator=gen, device=dev).mul_(std)
            b, s = quantize_expert_weight(w)
            blocks[e:e + 1].copy_(b)
            scales[e:e + 1].copy_(s)
    module.gate_up_proj_bias.zero_()
    module.down_proj_bias.zero_()
