"""A layer's experts over tiles of tokens, each tile recomputed in backward (``kernels.moe_tile_tokens``).

The expert mixture is per token: token t's output depends only on its hidden state, its top-k expert
ids and its routing weights. So the sequence can go through the experts a tile at a time. In forward
``_TiledExperts`` runs each tile without building a graph and keeps only its inputs; in backward it
runs each tile again with gradients on and back-propagates it at once. A layer's MoE working set (the
top-k permuted copies, the gate_up output, the SwiGLU, the down output and their gradients) is then
one tile's, not the sequence's: 115 KB per token for 20b, 7 GiB at a 64K tile instead of 56 GiB at
512K. The cost: each tile's forward runs once more (see ``_in_recomputation`` for why only once).

Trainable parameters of the experts (full fine-tuning: the expert weights and biases; LoRA on the
experts: peft's lora_A/lora_B, applied through its parametrization when the experts module is called)
are inputs of the Function and their gradients its outputs, so autograd accumulates them into
``.grad`` as for any op and FSDP2's post-backward hooks see ordinary gradients.

``tile_mlp_`` installs it in transformers' ``GptOssMLP`` (the experts' only call site) for the fused
dense experts and ``Mxfp4Experts``; the eager and grouped_mm references stay untouched.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn


def _in_recomputation() -> bool:
    """True when this forward runs inside a backward pass: a checkpointed layer being recomputed (torch's
    non-reentrant checkpoint recomputes from the unpack hook of a saved tensor, during backward;
    torch/utils/checkpoint.py ``_checkpoint_hook.unpack_hook`` reads the same graph-task id). There the
    experts' output is never read: the tiled Function saves only its inputs, and once they are saved the
    recomputation stops (``early_stop``) or feeds the output only to ops whose results are discarded.
    So the recomputed forward skips the experts, and the MoE forward runs twice per step, not three times."""
    return torch._C._current_graph_task_id() != -1


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _TiledExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, experts: nn.Module, tile: int, hidden, router_indices, routing_weights, *params):
        ctx.experts, ctx.tile, ctx.params = experts, tile, params  # parameters ride on ctx, never offloaded
        ctx.autocast = _autocast_state(hidden.device.type)
        ctx.save_for_backward(hidden, router_indices, routing_weights)
        out = torch.empty_like(hidden)
        if _in_recomputation():
            return out
        with torch.no_grad():
            for start in range(0, hidden.shape[0], tile):
                end = start + tile
                out[start:end] = experts(hidden[start:end], router_indices[start:end], routing_weights[start:end])
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, router_indices, routing_weights = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[2], ctx.needs_input_grad[4]
        trained = [i for i, p in enumerate(ctx.params) if ctx.needs_input_grad[5 + i]]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.empty_like(routing_weights) if need_w else None
        # Parameter gradients are sums over every token: summed over tiles in fp32, cast once at the end.
        acc = {i: torch.zeros(ctx.params[i].shape, dtype=torch.float32, device=ctx.params[i].device) for i in trained}
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(hidden.device.type, dtype=dtype, enabled=enabled):
            for start in range(0, hidden.shape[0], ctx.tile):
                end = start + ctx.tile
                h = hidden[start:end].detach().requires_grad_(need_h)
                w = routing_weights[start:end].detach().requires_grad_(need_w)
                y = ctx.experts(h, router_indices[start:end], w)
                inputs = ([h] if need_h else []) + ([w] if need_w else []) + [ctx.params[i] for i in trained]
                grads = list(torch.autograd.grad(y, inputs, grad_out[start:end], allow_unused=True))
                if need_h:
                    g = grads.pop(0)
                    grad_h[start:end] = 0 if g is None else g
                if need_w:
                    g = grads.pop(0)
                    grad_w[start:end] = 0 if g is None else g
                for i, g in zip(trained, grads):
                    if g is not None:
                        acc[i] += g.float()
                del y, grads
        grad_params = [None] * len(ctx.params)
        for i in trained:
            grad_params[i] = acc[i].to(ctx.params[i].dtype)
        return (None, None, grad_h, None, grad_w, *grad_params)


@torch.compiler.disable  # a graph break in a compiled layer: backward calls the experts module itself
def tiled_experts(experts: nn.Module, hidden: torch.Tensor, router_indices: torch.Tensor,
                  routing_weights: torch.Tensor, tile: int) -> torch.Tensor:
    """``experts(hidden, router_indices, routing_weights)`` over tiles of ``tile`` tokens ((T, H) hidden)."""
    if tile < 1:
        raise ValueError(f"kernels.moe_tile_tokens must be >= 1, got {tile}")
    if hidden.shape[0] <= tile or not torch.is_grad_enabled():
        return experts(hidden, router_indices, routing_weights)  # one tile, or nothing to recompute: as is
    params = [p for p in experts.parameters() if p.requires_grad]
    return _TiledExperts.apply(experts, tile, hidden, router_indices, routing_weights, *params)


def tiled_mlp_forward(mlp: nn.Module, tile: int, hidden_states: torch.Tensor):
    """transformers' ``GptOssMLP.forward`` (models/gpt_oss/modeling_gpt_oss.py, 5.24) with the experts
    call tiled; ``mlp.experts`` is looked up at each call, so peft's wrappers around it are what runs."""
    batch_size, sequence_length, hidden_dim = hidden_states.shape
    hidden_states = hidden_states.reshape(-1, hidden_dim)
    _, router_scores, router_indices = mlp.router(hidden_states)
    hidden_states = tiled_experts(mlp.experts, hidden_states, router_indices, router_scores, tile)
    return hidden_states.reshape(batch_size, sequence_length, hidden_dim), router_scores


def tile_mlp_(mlp: nn.Module, tile: int | None) -> None:
    """Tile (or, with None, stop tiling) the experts of one ``GptOssMLP``."""
    if tile is None:
        mlp.__dict__.pop("forward", None)
        return
    if tile < 1:
        raise ValueError(f"kernels.moe_tile_tokens must be >= 1, got {tile}")
    mlp.forward = partial(tiled_mlp_forward, mlp, int(tile))
