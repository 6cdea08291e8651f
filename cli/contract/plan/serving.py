"""Tensor-parallel sizing for vLLM: the smallest power of two at which one GPU holds its share of the model, a
useful KV cache and vLLM's own overhead.

Pure arithmetic (no torch, no vLLM); what vLLM allocates is modelled in ``vllm_memory.py``. At TP = t one GPU must hold

    its weights (by format: bf16, or MXFP4 experts as vLLM lays them out on Hopper)
    + the KV cache of ``serve.kv_sequences`` sequences of ``max_model_len`` tokens
    + a fixed per-GPU overhead (CUDA graphs, sampler and activation buffers, NCCL)

within ``gpu_memory × gpu_memory_utilization``, vLLM's own budget. vLLM itself refuses to start only when the
KV cache left cannot hold one ``max_model_len`` sequence (``_check_enough_kv_cache_memory``,
vllm/v1/core/kv_cache_planning.py: "To serve at least one request with the model's max seq len"); asking for
``kv_sequences`` of them keeps enough concurrency for the server to be useful. The sizing reports how many
full-length sequences the leftover really holds. docs/serving-sizes.md has the numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.contract.plan.vllm_memory import (
    FORMATS, GiB, checkpoint_bytes, in_flight_tokens, kv_bytes_per_sequence, weight_bytes_per_gpu,
)
from gptoss_cloud.contract.deploy_sections import ServeSection
from gptoss_cloud.contract.shapes import ModelShape

PER_GPU_OVERHEAD_GIB = 4.0   # CUDA graphs, sampler and activation buffers, NCCL workspaces
# Full-length sequences the KV cache must hold at once: serve.kv_sequences' default (its reasons in docs/serving-sizes.md).
DEFAULT_KV_SEQUENCES = ServeSection.model_fields["kv_sequences"].default
MAX_TP = 8                   # one Deployment pod = one node; vLLM TP does not span nodes here


def weight_bytes(shape: ModelShape, fmt: str = "bf16") -> int:
    """The merged folder's weights in ``fmt`` (what is fetched and loaded)."""
    return checkpoint_bytes(shape, fmt)


def valid_tp(shape: ModelShape, tp: int) -> bool:
    """vLLM splits attention heads evenly, KV heads evenly (or replicates them when tp > kv heads), and the
    experts' intermediate size evenly (``FusedMoEConfig.__post_init__`` asserts it)."""
    kv = shape.num_key_value_heads
    return (tp >= 1 and shape.num_attention_heads % tp == 0 and (kv % tp == 0 or tp % kv == 0)
            and shape.intermediate_size % tp == 0)


@dataclass(frozen=True)
class TpSizing:
    tp: int
    fmt: str
    max_model_len: int
    weights_gib: float          # the merged folder, whole model
    weights_per_gpu_gib: float  # what vLLM allocates for weights on one GPU at this tp
    kv_seq_gib: float           # one max_model_len sequence's KV cache on one GPU
    kv_sequences: int           # sequences asked for
    overhead_gib: float
    budget_gib: float           # gpu_memory_gib * utilization

    @property
    def per_gpu_gib(self) -> float:
        return self.weights_per_gpu_gib + self.kv_sequences * self.kv_seq_gib + self.overhead_gib

    @property
    def fits(self) -> bool:
        return self.per_gpu_gib <= self.budget_gib

    @property
    def sequences_held(self) -> int:
        """Full-length sequences the KV cache left after weights and overhead really holds (vLLM needs 1)."""
        return max(0, math.floor((self.budget_gib - self.weights_per_gpu_gib - self.overhead_gib) / self.kv_seq_gib))

    def describe(self) -> str:
        return (
            f"TP={self.tp} {self.fmt}: {self.weights_per_gpu_gib:.1f} GiB weights + {self.kv_sequences} x "
            f"{self.kv_seq_gib:.2f} GiB KV ({self.max_model_len:,}-token sequences) + {self.overhead_gib:g} GiB overhead "
            f"= {self.per_gpu_gib:.1f} GiB per GPU against a {self.budget_gib:.1f} GiB budget; the KV cache left holds "
            f"{self.sequences_held} full-length sequence(s)"
        )

    def to_dict(self) -> dict:
        return {"format": self.fmt, "tp": self.tp, "weights_gib": round(self.weights_gib, 2),
                "weights_per_gpu_gib": round(self.weights_per_gpu_gib, 2), "kv_sequence_gib": round(self.kv_seq_gib, 3),
                "kv_sequences": self.kv_sequences, "per_gpu_gib": round(self.per_gpu_gib, 2),
                "budget_gib": round(self.budget_gib, 2), "sequences_held": self.sequences_held, "fits": self.fits}


def per_gpu(shape: ModelShape, tp: int, *, gpu_memory_gib: float, utilization: float, max_model_len: int,
            kv_sequences: int = DEFAULT_KV_SEQUENCES, fmt: str = "bf16") -> TpSizing:
    kv = kv_bytes_per_sequence(shape, max_model_len, tp=tp, in_flight=in_flight_tokens(gpu_memory_gib))
    return TpSizing(tp=tp, fmt=fmt, max_model_len=max_model_len, weights_gib=weight_bytes(shape, fmt) / GiB,
                    weights_per_gpu_gib=weight_bytes_per_gpu(shape, fmt, tp) / GiB, kv_seq_gib=kv / GiB,
                    kv_sequences=kv_sequences, overhead_gib=PER_GPU_OVERHEAD_GIB, budget_gib=gpu_memory_gib * utilization)


def size_tp(shape: ModelShape, *, gpu_memory_gib: float, utilization: float = 0.9, max_model_len: int = 32768,
            kv_sequences: int = DEFAULT_KV_SEQUENCES, fmt: str = "bf16", max_tp: int = MAX_TP) -> TpSizing:
    """The smallest power-of-two TP (valid for the model's heads) that fits; a clear error when none does."""
    if gpu_memory_gib <= 0 or not 0 < utilization <= 1:
        raise GptossError(f"bad GPU memory budget: {gpu_memory_gib} GiB × utilization {utilization}")
    if fmt not in FORMATS:
        raise GptossError(f"serving format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    tried: list[TpSizing] = []
    tp = 1
    while tp <= max_tp:
        if valid_tp(shape, tp):
            tried.append(per_gpu(shape, tp, gpu_memory_gib=gpu_memory_gib, utilization=utilization,
                                 max_model_len=max_model_len, kv_sequences=kv_sequences, fmt=fmt))
            if tried[-1].fits:
                return tried[-1]
        tp *= 2
    if not tried:
        raise GptossError(f"model {shape.name}: no valid TP up to {max_tp} for its heads and experts")
    last = tried[-1]
    where = f"one node of {max_tp} x {gpu_memory_gib:g} GiB GPUs"
    if last.sequences_held >= 1:   # the weights fit; the KV cache asked for does not
        raise GptossError(
            f"model {shape.name} ({fmt}) does not fit {where} with KV for {kv_sequences} full-length sequences ({last.describe()})",
            hint=f"lower serve.kv_sequences to {last.sequences_held} or less (vLLM needs 1), lower serve.max_model_len, "
                 "or use GPUs with more memory (cluster.gpu_type / cluster.gpu_memory_gib)",
        )
    raise GptossError(
        f"model {shape.name} ({fmt}) does not fit {where} for serving ({last.describe()})",
        hint="use GPUs with more memory (cluster.gpu_type / cluster.gpu_memory_gib), lower serve.max_model_len"
             + (", or serve the MXFP4 merge (output.merge_format: mxfp4)" if fmt == "bf16" else ""),
    )


def size_formats(shape: ModelShape, **kw) -> dict[str, TpSizing | GptossError]:
    """Both formats' sizing (the planner shows them side by side); a format that fits nowhere maps to its error."""
    out: dict[str, TpSizing | GptossError] = {}
    for fmt in FORMATS:
        try:
            out[fmt] = size_tp(shape, fmt=fmt, **kw)
        except GptossError as e:
            out[fmt] = e
    return out


# ---------------------------------------------------------------------------------------- from a spec
def sizing_args(spec, shape: ModelShape) -> dict:
    """The spec's serving budget: the card's memory (contract/plan/gpus.py), serve.gpu_memory_utilization,
    serve.max_model_len as vLLM is given it (capped at the model's max_position_embeddings, render/vllm.py), and
    serve.kv_sequences."""
    from gptoss_cloud.contract.plan.gpus import gpu_info

    s = spec.serve
    return {"gpu_memory_gib": gpu_info(spec).memory_gib, "utilization": s.gpu_memory_utilization,
            "max_model_len": min(s.max_model_len, shape.max_position_embeddings), "kv_sequences": s.kv_sequences}


@dataclass(frozen=True)
class ServingPlan:
    serve_format: str                             # what `serve` would use once the run's merge is published
    gpu_type: str
    sizes: dict[str, TpSizing | GptossError]      # per format

    def to_dict(self) -> dict:
        return {"serve_format": self.serve_format, "gpu_type": self.gpu_type,
                "formats": {f: s.to_dict() if isinstance(s, TpSizing) else {"fits": False, "error": s.message}
                            for f, s in self.sizes.items()}}


def serving_plan(spec, shape: ModelShape) -> ServingPlan:
    """Both formats' serving sizes for the spec's cluster, and the one its merge resolves to (contract/merged.py)."""
    from gptoss_cloud.contract.merged import merge_format_for

    return ServingPlan(serve_format=merge_format_for(spec), gpu_type=spec.cluster.gpu_type,
                       sizes=size_formats(shape, **sizing_args(spec, shape)))
