"""The trained module and the packed batches it is fed.

- Packed rows never attend across samples: ``packed_attention_masks`` builds the per-layer-type masks
  from the segment lengths and the model receives them ready-made.
- The trained module is ``CausalLMWithChunkedLoss``: decoder -> final hidden states -> chunked
  linear + cross-entropy, so full logits are never materialised.

How the model inside it is built (shape, kernels, weights, LoRA) is ``gptoss_cloud.trainer.model``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gptoss_cloud.trainer.kernels import attention
from gptoss_cloud.trainer.kernels.loss import chunked_linear_cross_entropy, shift_packed_labels
from gptoss_cloud.trainer.model import hf_model


# --------------------------------------------------------------------------------------------- masks
def segment_ids(seq_lens: list[list[int]], seq_len: int, device: torch.device) -> torch.Tensor:
    """(batch, seq_len) int tensor: which packed segment each position belongs to."""
    rows = []
    for lens in seq_lens:
        if sum(lens) != seq_len:
            raise ValueError(f"packed segment lengths {lens} sum to {sum(lens)}, not the row length {seq_len}")
        rows.append(torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)))
    return torch.stack(rows).to(device)


def packed_attention_masks(config, seq_lens: list[list[int]], seq_len: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Per-layer-type masks (causal / sliding-window causal) that also forbid attention across segments.

    Returned as the dict GptOssModel accepts in place of a 2-D mask, in the format of the configured
    attention implementation (a 4-D additive mask for eager, a BlockMask for flex attention). Within a
    segment positions are contiguous, so the window on row indices equals the window on positions.
    """
    from transformers.masking_utils import (
        create_causal_mask,
        create_sliding_window_causal_mask,
        packed_sequence_mask_function,
    )

    if config._attn_implementation == attention.NAME:  # our BlockMasks, cached per batch shape
        return attention.packed_block_masks(config, seq_lens, seq_len, device)
    seg = segment_ids(seq_lens, seq_len, device)
    stub = torch.empty((len(seq_lens), seq_len, 0), dtype=dtype, device=device)  # shape/dtype/device only
    same_segment = packed_sequence_mask_function(seg)
    # Positional cache argument (None): its keyword differs between transformers 5.17 and 5.24.
    return {
        "full_attention": create_causal_mask(config, stub, None, None, and_mask_function=same_segment),
        "sliding_attention": create_sliding_window_causal_mask(config, stub, None, None, and_mask_function=same_segment),
    }


# -------------------------------------------------------------------------------------- trained module
@dataclass
class Batch:
    """One micro-batch of packed rows, as tensors on the training device."""

    input_ids: torch.Tensor  # (B, L) int64
    targets: torch.Tensor  # (B, L) int64, next-token targets, -100 = not trained
    position_ids: torch.Tensor  # (B, L) int64, restarting per segment
    seq_lens: list[list[int]]

    @classmethod
    def from_samples(cls, samples: list[Any], device: torch.device) -> "Batch":
        """From PackedSample-like objects (input_ids, labels, position_ids, seq_lens: plain int lists)."""
        ids = torch.tensor([s.input_ids for s in samples], dtype=torch.long)
        labels = torch.tensor([s.labels for s in samples], dtype=torch.long)
        pos = torch.tensor([s.position_ids for s in samples], dtype=torch.long)
        seq_lens = [list(s.seq_lens) for s in samples]
        targets = shift_packed_labels(labels, seq_lens)
        return cls(ids.to(device), targets.to(device), pos.to(device), seq_lens)

    @property
    def trained_tokens(self) -> int:
        return int((self.targets != -100).sum())


class CausalLMWithChunkedLoss(nn.Module):
    """The module that is trained and sharded: returns (summed loss, trained tokens, router aux loss).

    Holds the (possibly peft-wrapped) GptOssForCausalLM as ``lm``. ``get_input_embeddings`` /
    ``get_output_embeddings`` / ``base_model_prefix`` let accelerate's FSDP2 wrapping find the
    embedding and the output head (final norm + lm_head) and shard them as their own units.
    """

    base_model_prefix = "decoder"

    def __init__(self, lm: nn.Module, chunk_tokens: int = 1024, router_aux: bool = False, activation_offload: bool = False):
        super().__init__()
        self.lm = lm
        self.chunk_tokens = chunk_tokens
        self.router_aux = router_aux
        # parallelism.activation_offload: what autograd saves outside the recomputed layers waits for
        # backward in host memory (trainer/offload.py); ``offload_stats`` says what the last forward moved.
        self.activation_offload = activation_offload
        self.offload_min_bytes: int | None = None  # None: offload.MIN_OFFLOAD_BYTES (tests lower it)
        self.offload_stats = None

    @property
    def causal_lm(self) -> nn.Module:
        return hf_model(self.lm)

    @property
    def decoder(self) -> nn.Module:
        return self.causal_lm.model

    @property
    def config(self):
        return self.causal_lm.config

    def get_input_embeddings(self) -> nn.Module:
        return self.causal_lm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.causal_lm.get_output_embeddings()

    def forward(self, input_ids, position_ids, targets, attention_masks: dict):
        if not (self.activation_offload and torch.is_grad_enabled()):
            return self._forward(input_ids, position_ids, targets, attention_masks)
        from gptoss_cloud.trainer.offload import MIN_OFFLOAD_BYTES, offload_saved_tensors

        hooks = offload_saved_tensors(MIN_OFFLOAD_BYTES if self.offload_min_bytes is None else self.offload_min_bytes)
        with hooks:
            out = self._forward(input_ids, position_ids, targets, attention_masks)
        self.offload_stats = hooks.stats
        return out

    def _forward(self, input_ids, position_ids, targets, attention_masks: dict):
        out = self.decoder(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_masks,
            use_cache=False, output_router_logits=self.router_aux,
        )
        hidden = out.last_hidden_state
        weight = self.get_output_embeddings().weight
        loss_sum, count = chunked_linear_cross_entropy(hidden, weight, targets, self.chunk_tokens)
        aux = None
        if self.router_aux:
            from transformers.models.gpt_oss.modeling_gpt_oss import load_balancing_loss_func

            cfg = self.config
            aux = load_balancing_loss_func(out.router_logits, cfg.num_local_experts, cfg.num_experts_per_tok, None)
        return loss_sum, count, aux


def run_batch(module: nn.Module, batch: Batch, config, dtype: torch.dtype):
    """Masks for the batch, then the module's forward: (loss_sum, trained_tokens, aux)."""
    masks = packed_attention_masks(config, batch.seq_lens, batch.input_ids.shape[1], batch.input_ids.device, dtype)
    return module(batch.input_ids, batch.position_ids, batch.targets, masks)


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
