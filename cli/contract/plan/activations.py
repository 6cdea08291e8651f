"""What a training step keeps of the sequence: activations on the GPU, and what activation offloading moves
to the host. Pure functions of (RunSpec, ModelShape); ``memory.py`` adds them to its GPU and host plans.

* With recomputation, every decoder layer's input stays until backward (``layers x tokens x hidden x 2``)
  and one layer is recomputed at a time with its gradients; without it, every layer's saved tensors.
* ``parallelism.activation_offload`` keeps the layer inputs, the final norm's fp32 tensors and the loss's
  hidden-state gradient in pinned host memory (trainer/offload.py); the GPU holds one layer's input at
  a time, brought back for its recomputation.
* ``kernels.moe_tile_tokens`` runs the experts a tile at a time (trainer/kernels/tiled_experts.py): the
  MoE part of a layer's working set (top-k permuted copies, gate_up, SwiGLU, down) scales with the
  tile, plus the tiled Function's own whole-sequence output and input gradient.
"""

from __future__ import annotations

from gptoss_cloud.contract.plan.sizes import BF16, FP32
from gptoss_cloud.contract.shapes import ModelShape
from gptoss_cloud.contract.spec import RunSpec

# ---- assumptions (calibrate against docs/benchmarks.md; docs/plan.md lists them) -------------
EAGER_ATTN_SCORE_TENSORS = 2.5             # s x s bf16 tensors alive at the peak of an eager layer's backward
BACKWARD_LAYER_FACTOR = 2.0                # a layer's backward holds its activations and their gradients
# Compiled decoder layers (kernels.compile, on by default on GPUs) save fewer tensors than eager ones:
# the partitioner recomputes cheap elementwise ops in backward instead of saving their outputs, and
# fused kernels need fewer temporaries. 20b LoRA on H100/H200: the saved activations of all layers
# 0.61-0.70 of eager's (4,096 tokens), one recomputed layer's working set 0.35-0.64 (4K and 64K).
COMPILED_SAVED_FACTOR = 0.70
COMPILED_RECOMPUTE_FACTOR = 0.50
LORA_EXPERT_WORKING_COPIES = 3             # LoRA on experts: W + B·A, B·A and the gradient of W + B·A, per layer
TILED_IO_HIDDEN_COPIES = 2                 # tiled MoE: its whole-sequence output (forward) / input gradient (backward)
# Outside the layers, per token: the final RMSNorm's fp32 input and normalised output, the loss's bf16 gradient.
HEAD_SAVED_BYTES_PER_HIDDEN = 2 * FP32 + BF16
# The tile the planner proposes (suggestions, longest_seq): 3.5 GiB of 20b MoE activations per pass
# (12.7 GiB with gradients and the whole-sequence I/O at 512K), 16-32 passes over 512K-1M tokens, each
# dequantising the layer's MXFP4 experts once: small against the pass's GEMMs.
SUGGESTED_MOE_TILE = 32768


def moe_bytes_per_token(shape: ModelShape) -> int:
    """A layer's MoE activations per token: top-k permuted inputs, gate_up output, activation, down output (bf16)."""
    return BF16 * shape.num_experts_per_tok * (2 * shape.hidden_size + 3 * shape.intermediate_size)


def layer_activation_bytes(shape: ModelShape, tokens: int, moe_tokens: int | None = None) -> float:
    """Saved tensors of one decoder layer for ``tokens`` tokens (bf16; router in fp32), the MoE part for
    ``moe_tokens`` of them (one tile) when given."""
    h, e, k = shape.hidden_size, shape.num_local_experts, shape.num_experts_per_tok
    q, kv = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    # norms in/out x2, residual adds x2; q,k,v; attention output x2 (before/after o_proj input).
    rest = BF16 * (6 * h + 2 * q + 2 * kv) + FP32 * (shape.num_attention_heads + e + k)
    return rest * tokens + moe_bytes_per_token(shape) * (tokens if moe_tokens is None else moe_tokens)


def eager_attention_bytes(shape: ModelShape, micro_batch: int, seq: int) -> float:
    return EAGER_ATTN_SCORE_TENSORS * BF16 * micro_batch * shape.num_attention_heads * seq * (seq + 1)


def moe_tile(spec: RunSpec, tokens: int) -> int | None:
    """The tile the experts run in (``kernels.moe_tile_tokens``), or None when the whole sequence goes at
    once (unset, or a tile that holds every token of the micro-batch)."""
    tile = spec.kernels.moe_tile_tokens
    return tile if tile is not None and tile < tokens else None


def activation_components(shape: ModelShape, spec: RunSpec, recompute: bool, compiled: bool) -> dict[str, float]:
    """Bytes per GPU of the activations of ``micro_batch x max_seq_len`` tokens, by component."""
    b, s = spec.optim.micro_batch_size, spec.data.max_seq_len
    tokens, h = b * s, shape.hidden_size
    tile = moe_tile(spec, tokens)
    out: dict[str, float] = {}
    if recompute:
        if spec.parallelism.activation_offload:
            out["offloaded layer input, one brought back"] = tokens * h * BF16
        else:
            out["checkpointed layer inputs"] = shape.num_hidden_layers * tokens * h * BF16
        factor = BACKWARD_LAYER_FACTOR * (COMPILED_RECOMPUTE_FACTOR if compiled else 1.0)
        if tile is None:
            out["one layer recomputed + its grads"] = layer_activation_bytes(shape, tokens) * factor
        else:
            out["one layer recomputed + its grads (MoE tiled)"] = layer_activation_bytes(shape, tokens, 0) * factor
            # The tiles run outside the compiled graph (a graph break): eager's working set, one tile's.
            out[f"MoE tile ({tile:,} tokens) + its grads"] = (moe_bytes_per_token(shape) * tile * BACKWARD_LAYER_FACTOR
                                                             + TILED_IO_HIDDEN_COPIES * tokens * h * BF16)
    else:  # + the gradient working set of one layer
        # A tiled MoE saves only its inputs (counted with the layer's); its backward works one tile at a time.
        saved = shape.num_hidden_layers * layer_activation_bytes(shape, tokens, None if tile is None else 0)
        out["activations (all layers)"] = (saved + layer_activation_bytes(shape, tokens, tile)) * (COMPILED_SAVED_FACTOR if compiled else 1.0)
    lora = spec.method.lora
    if spec.method.kind == "full" and tile is not None:
        # The tiled Function sums each expert weight's gradient over the tiles in fp32 (one layer at a time).
        out["tiled MoE fp32 gradient sums (one layer)"] = shape.num_local_experts * shape.expert_params * FP32
    elif spec.method.kind != "full" and lora.experts:
        # peft adapts the 3-D expert weights through a parametrization: every access builds W + B·A
        # whole (the layer's gathered bf16 experts), backward builds its gradient too. Recomputed
        # layers hold that for one layer at a time; otherwise each adapted layer keeps its W + B·A.
        # From the mechanism, not yet measured on a GPU.
        w = shape.num_local_experts * shape.expert_params * BF16
        adapted = len(lora.expert_layers) if lora.expert_layers is not None else shape.num_hidden_layers
        if recompute:
            out["LoRA experts: W + B·A, B·A and its gradient (one layer)"] = LORA_EXPERT_WORKING_COPIES * w
        else:
            out["LoRA experts: W + B·A kept per adapted layer"] = adapted * w + (LORA_EXPERT_WORKING_COPIES - 1) * w
    return out


def offloaded_host_bytes(shape: ModelShape, spec: RunSpec) -> float:
    """Pinned host bytes per GPU that ``parallelism.activation_offload`` keeps from forward to backward: every
    layer's input, and what the head saves (the final norm's fp32 tensors, the loss's hidden-state gradient)."""
    if not spec.parallelism.activation_offload:
        return 0.0
    tokens = spec.optim.micro_batch_size * spec.data.max_seq_len
    return tokens * shape.hidden_size * (shape.num_hidden_layers * BF16 + HEAD_SAVED_BYTES_PER_HIDDEN)


def long_context_settings(spec: RunSpec) -> dict[str, object]:
    """The ``section__field`` settings that switch on what ``spec`` lacks of activation offload and MoE tiles
    (empty when it has both, or when ``activation_checkpointing: false`` rules offloading out)."""
    out: dict[str, object] = {}
    if spec.parallelism.activation_checkpointing is False:
        return out
    if not spec.parallelism.activation_offload:
        out["parallelism__activation_offload"] = True
    if spec.kernels.moe_tile_tokens is None:
        out["kernels__moe_tile_tokens"] = SUGGESTED_MOE_TILE
    return out
