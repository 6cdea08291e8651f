"""Tensor-parallel sizing for vLLM: the smallest power of two whose share of the model fits a GPU.

Pure arithmetic on ``gptoss_cloud.contract.shapes`` (no torch, no vLLM). What one GPU must hold at TP = t:

    bf16 weights / t  +  KV cache headroom / t  +  a fixed per-GPU overhead (CUDA graphs, activations, NCCL)

and that must fit ``gpu_memory × gpu_memory_utilization`` (vLLM's own budget). The KV headroom is
``kv_sequences`` full-length sequences: full-attention layers hold ``max_model_len`` tokens, the
sliding-window layers of GPT-OSS only their window. Merged weights are served in bf16 (a bf16 120b is
~234 GB, so TP >= 4 on 80 GB cards); the published MXFP4 checkpoints are smaller, so the figure errs
on the safe side for ``--adapter`` serving.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.contract.shapes import ModelShape

GiB = 1024**3
BF16_BYTES = 2
PER_GPU_OVERHEAD_GIB = 4.0   # CUDA graphs, sampler and activation buffers, NCCL workspaces
DEFAULT_KV_SEQUENCES = 8     # full-length sequences the KV cache must hold at once
MAX_TP = 8                   # one Deployment pod = one node; vLLM TP does not span nodes here


def weight_bytes(shape: ModelShape, dtype_bytes: int = BF16_BYTES) -> int:
    return shape.total_params * dtype_bytes


def kv_bytes_per_sequence(shape: ModelShape, max_model_len: int, dtype_bytes: int = BF16_BYTES) -> int:
    """KV cache of one sequence: K and V per layer; sliding-window layers keep only their window."""
    per_token_layer = 2 * shape.num_key_value_heads * shape.head_dim * dtype_bytes
    tokens = 0
    for kind in shape.layer_types():
        tokens += min(max_model_len, shape.sliding_window) if kind == "sliding_attention" else max_model_len
    return per_token_layer * tokens


def valid_tp(shape: ModelShape, tp: int) -> bool:
    """vLLM splits attention heads evenly and KV heads evenly (or replicates them when tp > kv heads)."""
    kv = shape.num_key_value_heads
    return tp >= 1 and shape.num_attention_heads % tp == 0 and (kv % tp == 0 or tp % kv == 0)


@dataclass(frozen=True)
class TpSizing:
    tp: int
    weights_gib: float          # whole model, bf16
    kv_gib: float               # whole KV headroom
    per_gpu_gib: float          # what one GPU holds at this tp
    budget_gib: float           # gpu_memory_gib * utilization
    fits: bool

    def describe(self) -> str:
        return (
            f"TP={self.tp}: {self.weights_gib:.1f} GiB bf16 weights + {self.kv_gib:.1f} GiB KV headroom "
            f"-> {self.per_gpu_gib:.1f} GiB per GPU against a {self.budget_gib:.1f} GiB budget"
        )


def per_gpu(shape: ModelShape, tp: int, *, gpu_memory_gib: float, utilization: float, max_model_len: int,
            kv_sequences: int = DEFAULT_KV_SEQUENCES) -> TpSizing:
    w = weight_bytes(shape) / GiB
    kv = kv_sequences * kv_bytes_per_sequence(shape, max_model_len) / GiB
    need = (w + kv) / tp + PER_GPU_OVERHEAD_GIB
    budget = gpu_memory_gib * utilization
    return TpSizing(tp=tp, weights_gib=w, kv_gib=kv, per_gpu_gib=need, budget_gib=budget, fits=need <= budget)


def size_tp(shape: ModelShape, *, gpu_memory_gib: float, utilization: float = 0.9, max_model_len: int = 32768,
            kv_sequences: int = DEFAULT_KV_SEQUENCES, max_tp: int = MAX_TP) -> TpSizing:
    """The smallest power-of-two TP (valid for the head counts) that fits; a clear error when none does."""
    if gpu_memory_gib <= 0 or not 0 < utilization <= 1:
        raise GptossError(f"bad GPU memory budget: {gpu_memory_gib} GiB × utilization {utilization}")
    tp = 1
    last = None
    while tp <= max_tp:
        if valid_tp(shape, tp):
            last = per_gpu(shape, tp, gpu_memory_gib=gpu_memory_gib, utilization=utilization,
                           max_model_len=max_model_len, kv_sequences=kv_sequences)
            if last.fits:
                return last
        tp *= 2
    detail = last.describe() if last else f"no valid TP up to {max_tp}"
    raise GptossError(
        f"model {shape.name} does not fit one node of {max_tp} × {gpu_memory_gib:g} GiB GPUs for serving ({detail})",
        hint="use GPUs with more memory (cluster.gpu_memory_gib), lower serve.max_model_len, or serve with --adapter on the MXFP4 base",
    )
