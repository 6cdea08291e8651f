"""GPT-OSS attention with learned sinks on flex attention, with an exact sink gradient.

GPT-OSS adds one learned logit per head, the *sink*, to every query's softmax and then drops it:
``p_j = exp(s_j) / (sum_k exp(s_k) + exp(sink))``. transformers' eager reference concatenates the
sink column to the score matrix (``eager_attention_forward`` in modeling_gpt_oss.py). A fused kernel
cannot see that column, but it can return the log-sum-exp of the real scores, ``lse``; then

    out_with_sink = out * exp(lse) / (exp(lse) + exp(sink)) = out * sigmoid(lse - sink)

is exact, and autograd gives the sink (and, through ``lse``, q and k) their gradients. torch's flex
attention back-propagates a gradient of ``lse`` in its Triton kernel (since torch 2.5); the factor
is computed from the fp32 ``lse`` (transformers rounds ``lse`` to bf16 first).

Masks: one flex ``BlockMask`` per batch and layer type — causal, same packed segment, and for
sliding layers ``q - kv < window`` (the window of transformers' ``sliding_window_overlay``) —
shared by every layer of that type and cached across batches with the same segment lengths.

The implementation is registered with transformers' ``AttentionInterface`` under ``NAME``, so a
``GptOssForCausalLM`` whose ``config._attn_implementation == NAME`` calls it for every layer.
See docs/attention.md.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch

NAME = "gptoss_flex"
_CACHE_SIZE = 8  # distinct (segment lengths, length, window) masks kept; a batch needs two

_compiled_flex: Callable | None = None
_mask_cache: "OrderedDict[tuple, object]" = OrderedDict()


# --------------------------------------------------------------------------------------------- masks
def segment_ids(seq_lens: list[list[int]], seq_len: int, device: torch.device | str) -> torch.Tensor:
    """(batch, seq_len) int32: the packed segment of each position (segments are contiguous runs)."""
    rows = []
    for lens in seq_lens:
        if sum(lens) != seq_len or any(n < 0 for n in lens):
            raise ValueError(f"packed segment lengths {lens} must be non-negative and sum to the row length {seq_len}")
        rows.append(torch.repeat_interleave(torch.arange(len(lens), dtype=torch.int32), torch.tensor(lens)))
    return torch.stack(rows).to(device)


def mask_mod_for(segments: torch.Tensor, window: int | None) -> Callable:
    """flex ``mask_mod``: kv is visible from q iff causal, same segment and (sliding) within the window."""

    def causal_same_segment(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (segments[b, q_idx] == segments[b, kv_idx])

    if window is None:
        return causal_same_segment

    def sliding(b, h, q_idx, kv_idx):
        return causal_same_segment(b, h, q_idx, kv_idx) & (q_idx - kv_idx < window)

    return sliding


def build_block_mask(segments: torch.Tensor, window: int | None):
    """The BlockMask for one layer type. On GPU ``create_block_mask`` is compiled, so the
    (seq x seq) boolean mask is never materialised (64K tokens would be 4 GiB per row)."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, n = segments.shape
    return create_block_mask(
        mask_mod_for(segments, window), B=b, H=None, Q_LEN=n, KV_LEN=n,
        device=segments.device, _compile=segments.device.type == "cuda",
    )


def packed_block_masks(config, seq_lens: list[list[int]], seq_len: int, device: torch.device | str) -> dict:
    """{"full_attention": BlockMask, "sliding_attention": BlockMask} for one batch of packed rows.

    Built once per batch and layer type (every layer of a type shares it) and cached by the segment
    lengths: a repeated batch shape (fixed packing, benchmarks) builds nothing.
    """
    device = torch.device(device)
    key_rows = tuple(tuple(int(n) for n in lens) for lens in seq_lens)
    out: dict = {}
    segments = None
    for layer_type, window in (("full_attention", None), ("sliding_attention", config.sliding_window)):
        if layer_type not in config.layer_types:
            continue
        key = (key_rows, seq_len, window, str(device))
        mask = _mask_cache.get(key)
        if mask is None:
            if segments is None:
                segments = segment_ids(seq_lens, seq_len, device)
            mask = build_block_mask(segments, window)
            _mask_cache[key] = mask
            while len(_mask_cache) > _CACHE_SIZE:
                _mask_cache.popitem(last=False)
        else:
            _mask_cache.move_to_end(key)
        out[layer_type] = mask
    return out


def clear_mask_cache() -> None:
    _mask_cache.clear()


# -------------------------------------------------------------------------------------------- kernel
def fold_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Add the sink to each query's softmax denominator: ``out * sigmoid(lse - sink)``.

    ``out``: (B, H, L, D) attention output without sink; ``lse``: (B, H, L) log-sum-exp of the
    visible scores (fp32); ``sinks``: (H,). A query that sees nothing (lse = -inf) gets 0, as in eager.
    The factor is computed in fp32 (rounding lse to bf16 first would shift it by up to ~3 %).
    """
    acc = _acc(out.dtype)
    scale = torch.sigmoid(lse.to(acc) - sinks.to(acc).view(1, -1, 1))
    return _ScaleRows.apply(out, scale)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 activations, fp64 for fp64 (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


class _ScaleRows(torch.autograd.Function):
    """``out * scale[..., None]`` with ``out`` in the activation dtype and ``scale`` fp32.

    Saves ``out`` as it is (no fp32 copy of the attention output per layer) and reduces the
    scale's gradient, sum over D of dout * out, in fp32 (in bf16 it doubles the sink-gradient error).
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(out, scale)
        return (out.to(scale.dtype) * scale.unsqueeze(-1)).to(out.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out, scale = ctx.saved_tensors
        acc = scale.dtype
        d_out = (grad.to(acc) * scale.unsqueeze(-1)).to(out.dtype) if ctx.needs_input_grad[0] else None
        d_scale = (grad.to(acc) * out.to(acc)).sum(-1) if ctx.needs_input_grad[1] else None
        return d_out, d_scale


def _flex():
    """flex_attention, compiled once on GPU (uncompiled flex materialises the whole score matrix)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():  # already inside a compiled region: let that compile it
        return flex_attention
    if _compiled_flex is None:
        # Default dynamic: a fixed packed length compiles once; a new length makes it shape-dynamic
        # instead of recompiling per length. New segment layouts (new mask closures) do not recompile.
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


def flex_with_lse(query, key, value, block_mask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): flex attention over ``block_mask`` returning the log-sum-exp (fp32) as well.

    query (B, Hq, L, D); key/value (B, Hkv, L, D) with Hq a multiple of Hkv (grouped-query heads).
    """
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    fn = _flex() if query.device.type == "cuda" else flex_attention
    out, aux = fn(
        query, key, value, block_mask=block_mask, scale=scale,
        enable_gqa=query.shape[1] != key.shape[1], return_aux=AuxRequest(lse=True),
    )
    return out, aux.lse


def sink_attention(query, key, value, sinks, block_mask, scale: float) -> torch.Tensor:
    """(B, Hq, L, D) attention output with the learned sinks folded in (gradients to all five inputs)."""
    out, lse = flex_with_lse(query, key, value, block_mask, scale)
    return fold_sinks(out, lse, sinks)


def gptoss_flex_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    scaling: float | None = None,
    dropout: float = 0.0,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface entry: returns ((B, L, Hq, D), no attention weights).

    ``attention_mask`` must be the layer type's BlockMask (``packed_block_masks``, or transformers'
    flex mask builder, which we register under the same name); the sliding window is in the mask.
    """
    from torch.nn.attention.flex_attention import BlockMask

    if dropout and dropout > 0:
        raise ValueError(f"{NAME} attention has no dropout; set attention_dropout to 0 (got {dropout})")
    if not isinstance(attention_mask, BlockMask):
        raise TypeError(
            f"{NAME} attention needs a flex BlockMask (causal / packed / sliding), got "
            f"{type(attention_mask).__name__}: build masks with packed_block_masks()"
        )
    sinks = s_aux if s_aux is not None else getattr(module, "sinks", None)
    if sinks is None:
        raise ValueError(f"{NAME} attention is GPT-OSS attention: the module has no learned sinks")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = sink_attention(query, key, value, sinks, attention_mask, scale)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Make ``NAME`` a transformers attention implementation (and mask format); returns ``NAME``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flex_attention_mask

    AttentionInterface.register(NAME, gptoss_flex_attention_forward)
    # So that GptOssModel builds BlockMasks itself when it is called without ready-made masks.
    AttentionMaskInterface.register(NAME, flex_attention_mask)
    return NAME
