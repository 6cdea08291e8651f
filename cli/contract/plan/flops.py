"""Training FLOPs per token: the one formula behind the planner's time estimate, ``bench``'s TFLOP/s
and MFU, and the trainer's ``mfu`` metric (pure; no torch).

It counts the matrix products a training step executes, per processed token:

* **dense** (on the active parameters: attention projections, router, the top-k experts, the head):
  forward 2N; backward 2N for the activation gradients; +2N for the weight gradients when every
  weight trains (full fine-tuning; LoRA trains adapters whose own products, ~0.5% of the dense term
  at r=16 on attention, are not counted); +2N when full recomputation runs the forward again.
  Selective recomputation keeps the GEMM outputs, so it adds no dense FLOPs.
* **attention scores** (QK^T and PV): forward 4 x q_dim x (keys each query attends) per layer; the
  backward 2x that; +1x when the scores are recomputed (full or selective recomputation both
  recompute attention). A causal full layer attends on average (s+1)/2 keys for a document of s
  tokens, a sliding layer min(position, window). FlashAttention-style kernels recompute the scores
  inside their backward as well; those hardware FLOPs are not model FLOPs and are not counted.

So LoRA without recomputation is 4N + attention, LoRA with full recomputation 6N + attention, full
fine-tuning 6N / 8N + attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from gptoss_cloud.contract.shapes import ModelShape

RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class FlopCount:
    dense: float  # per token
    attention: float  # per token, averaged over the tokens counted
    formula: str

    @property
    def per_token(self) -> float:
        return self.dense + self.attention


def recompute_name(recompute: bool | str) -> str:
    """True/False (the planner's and trainer's resolved flag) or a policy name -> a policy name."""
    if recompute is True:
        return "full"
    if recompute is False:
        return "none"
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    return recompute


def attended_keys(seq_lens: Iterable[int], window: int) -> tuple[int, int]:
    """(query, key) pairs a causal full layer and a sliding-window layer compute over packed documents."""
    full = sliding = 0
    for s in seq_lens:
        s = int(s)
        full += s * (s + 1) // 2
        w = min(window, s)
        sliding += w * (w + 1) // 2 + (s - w) * window
    return full, sliding


def dense_multiplier(method: str, recompute: bool | str) -> int:
    """Multiple of the active parameter count executed per token in one training step."""
    if method not in ("lora", "full"):
        raise ValueError(f"method must be lora or full, got {method!r}")
    forward = 2 * (2 if recompute_name(recompute) == "full" else 1)
    return forward + (4 if method == "full" else 2)


def training_flops(shape: ModelShape, method: str, recompute: bool | str, seq_lens: Iterable[int]) -> FlopCount:
    """FLOPs per token of a step over documents of lengths ``seq_lens`` (one row of ``s`` tokens: ``[s]``)."""
    lens = [int(s) for s in seq_lens]
    return flops_from_pairs(shape, method, recompute, sum(lens), *attended_keys(lens, shape.sliding_window))


def flops_from_pairs(shape: ModelShape, method: str, recompute: bool | str, tokens: int, full_pairs: int,
                     sliding_pairs: int) -> FlopCount:
    """``training_flops`` from the (query, key) pair counts ``attended_keys`` gives (the loop sums them per step)."""
    policy = recompute_name(recompute)
    mult = dense_multiplier(method, policy)
    passes = 3 + (0 if policy == "none" else 1)  # forward, backward (2x), recompute
    types = shape.layer_types()
    pairs = types.count("full_attention") * full_pairs + types.count("sliding_attention") * sliding_pairs
    q_dim = shape.num_attention_heads * shape.head_dim
    attention = passes * 4 * q_dim * pairs / max(1, tokens)
    formula = (f"{mult} x active_params + attention {passes} x 4 x q_dim x attended keys per token "
               f"(method={method}, recompute={policy})")
    return FlopCount(float(mult * shape.active_params), attention, formula)
