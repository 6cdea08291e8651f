"""What vLLM allocates on one GPU to serve GPT-OSS: weights by format and TP rank, and the KV cache of one sequence.

Pure arithmetic on ``ModelShape``, written against the vLLM the serve image pins (vllm/vllm-openai:v0.33.0,
images/serve.Dockerfile) on Hopper (H100/H200), where GPT-OSS's MXFP4 experts run on the OpenAI Triton kernels:

- MXFP4 backend: ``_get_priority_backends_for_gpt_oss`` (vllm/model_executor/layers/fused_moe/oracle/mxfp4.py)
  tries the FlashInfer TRT-LLM backends first (SM100 only), the ROCm AITER ones, then ``TRITON``, whose experts
  (``OAITritonExperts``, fused_moe/experts/gpt_oss_triton_kernels_moe.py) accept SM90.
- Padding: ``mxfp4_round_up_hidden_size_and_intermediate_size`` (same file) rounds the per-rank intermediate size
  of the TRITON backend up to a multiple of 64 (its last ``else`` branch) and leaves the hidden size; the
  allocation is ``GptOssMxfp4MoEMethod.create_weights`` (quantization/mxfp4.py): w13 (E, 2I, H/2) and w2
  (E, H, I/2) uint8 codes, (E, 2I, H/32) and (E, H, I/32) uint8 scales.
- ``convert_gpt_oss_weight_to_mxfp4_moe_kernel_format`` (oracle/mxfp4.py) then swizzles them for Hopper through
  ``_swizzle_mxfp4`` (quantization/utils/mxfp4_utils.py: scale groups padded to a multiple of 4 on SM90) into
  triton_kernels' ``HopperMXValueLayout`` (rows to 16, bytes to 32) and ``HopperMXScaleLayout`` (rows to
  2·num_warps·2·8 = 256 at num_warps 8, groups to 2) (vllm/third_party/triton_kernels/tensor_details/
  layout_details/hopper_{value,scale}.py), frees the originals, and keeps the expert biases in float32.
- bf16 experts (``UnquantizedFusedMoEMethod``): ``unquantized_round_up_hidden_size_and_intermediate_size``
  (fused_moe/oracle/unquantized.py) pads only for FlashInfer TRT-LLM (SM100) and AITER (ROCm): none on Hopper.
- Around the experts (models/gpt_oss.py): embedding and LM head split by vocabulary, attention by heads (KV heads
  replicated past their count), the router (``ReplicatedLinear``), norms and the row-parallel biases on every rank.

Every GPT-OSS dimension is a multiple of these alignments at TP 1, so there the MXFP4 experts cost what the
checkpoint holds plus a few percent of scale padding; at TP 2 the per-rank intermediate 1440 pads to 1472.
"""

from __future__ import annotations

from gptoss_cloud.contract.runs import MERGE_FORMATS as FORMATS  # what a merged folder holds
from gptoss_cloud.contract.shapes import ModelShape

GiB = 1024**3
BF16 = 2
FP32 = 4
MX_BLOCK = 32                 # elements sharing one e8m0 scale byte
KV_BLOCK_TOKENS = 16          # vLLM's default KV block size (CacheConfig.block_size) on CUDA


def _up(n: int, m: int) -> int:
    return -(-n // m) * m


def _cdiv(n: int, d: int) -> int:
    return -(-n // d)


# ------------------------------------------------------------------------------------- the checkpoint
def expert_matrix_params(shape: ModelShape) -> int:
    """The parameters MXFP4 stores as 4-bit codes: every expert's gate_up (H x 2I) and down (I x H), no biases."""
    h, i = shape.hidden_size, shape.intermediate_size
    return shape.num_hidden_layers * shape.num_local_experts * 3 * h * i


def checkpoint_bytes(shape: ModelShape, fmt: str) -> int:
    """The weights of a merged folder: all bf16, or expert matrices at 4.25 bits/param (4-bit codes plus one e8m0
    byte per 32) and everything else, expert biases included, bf16 (the published GPT-OSS layout)."""
    _check_format(fmt)
    if fmt == "bf16":
        return shape.total_params * BF16
    m = expert_matrix_params(shape)
    return m // 2 + m // MX_BLOCK + (shape.total_params - m) * BF16


# ---------------------------------------------------------------------------------------- per GPU
def expert_intermediate_per_rank(shape: ModelShape, fmt: str, tp: int) -> int:
    """The per-rank intermediate size vLLM allocates: I/tp, rounded up to 64 by the MXFP4 TRITON backend."""
    per_rank = shape.intermediate_size // tp
    return _up(per_rank, 64) if fmt == "mxfp4" else per_rank


def _mxfp4_expert_bytes(e: int, rows: int, cols: int) -> int:
    """One MXFP4 expert tensor (rows x cols, blocks along cols) after the Hopper swizzle: codes, scales."""
    codes = _up(rows, 16) * _up(cols // 2, 32)
    groups = _up(_up(cols // MX_BLOCK, 4), 2)
    return e * (codes + _up(rows, 256) * groups)


def expert_bytes_per_gpu(shape: ModelShape, fmt: str, tp: int) -> int:
    """Expert weights and biases one rank holds, all layers."""
    _check_format(fmt)
    e, h = shape.num_local_experts, shape.hidden_size
    i = expert_intermediate_per_rank(shape, fmt, tp)
    if fmt == "bf16":
        per_layer = e * (2 * i * h + h * i) * BF16 + e * (2 * i + h) * BF16
    else:  # w13: 2I rows over H, w2: H rows over I; biases float32 (w2's is full size on every rank)
        per_layer = _mxfp4_expert_bytes(e, 2 * i, h) + _mxfp4_expert_bytes(e, h, i) + e * (2 * i + h) * FP32
    return shape.num_hidden_layers * per_layer


def dense_bytes_per_gpu(shape: ModelShape, tp: int) -> int:
    """Everything but the experts, bf16, as models/gpt_oss.py splits it over ``tp`` ranks."""
    h, d, e = shape.hidden_size, shape.head_dim, shape.num_local_experts
    heads = shape.num_attention_heads // tp
    kv_heads = max(1, shape.num_key_value_heads // tp)
    q, kv = heads * d, kv_heads * d
    attention = (h * q + q) + 2 * (h * kv + kv) + q * h + h + heads  # qkv (+bias), o_proj, its bias replicated, sinks
    layer = attention + (h * e + e) + 2 * h                          # router and both norms replicated
    vocab = _cdiv(_up(shape.vocab_size, 64), tp) * h                 # VocabParallelEmbedding pads to 64
    heads_out = vocab * (1 if shape.tie_word_embeddings else 2)
    return (shape.num_hidden_layers * layer + heads_out + h) * BF16


def weight_bytes_per_gpu(shape: ModelShape, fmt: str, tp: int) -> int:
    return expert_bytes_per_gpu(shape, fmt, tp) + dense_bytes_per_gpu(shape, tp)


# ----------------------------------------------------------------------------------------- KV cache
def in_flight_tokens(gpu_memory_gib: float) -> int:
    """Tokens scheduled but not yet freed that a sliding-window layer must keep: ``VllmConfig.max_in_flight_tokens``
    (vllm/config/vllm.py) = 2 concurrent batches (async scheduling is on by default) x max_num_batched_tokens, whose
    OpenAI-server default (``EngineArgs._set_default_max_num_seqs_and_batched_tokens_args``, engine/arg_utils.py)
    is 16384 on >= 160 GiB GPUs, 8192 on >= 70 GiB (H100, H200) and 2048 below."""
    batched = 16384 if gpu_memory_gib >= 160 else 8192 if gpu_memory_gib >= 70 else 2048
    return 2 * batched


def kv_bytes_per_sequence(shape: ModelShape, max_model_len: int, *, tp: int = 1, in_flight: int = 0) -> int:
    """The KV cache one ``max_model_len`` sequence takes on one GPU, counted as vLLM admits it
    (vllm/v1/kv_cache_interface.py): full-attention layers hold every token in whole blocks
    (``FullAttentionSpec.max_memory_usage_bytes``), sliding-window layers the window less one plus the in-flight
    tokens, at most ``max_model_len``, in whole blocks plus one, as the window need not start on a block
    (``SlidingWindowSpec.max_admission_blocks_per_request``); bf16 K and V for the rank's KV heads."""
    kv_heads = max(1, shape.num_key_value_heads // tp)
    per_token_layer = 2 * kv_heads * shape.head_dim * BF16
    blocks = 0
    for kind in shape.layer_types():
        if kind == "sliding_attention":
            blocks += _cdiv(min(shape.sliding_window - 1 + in_flight, max_model_len), KV_BLOCK_TOKENS) + 1
        else:
            blocks += _cdiv(max_model_len, KV_BLOCK_TOKENS)
    return per_token_layer * KV_BLOCK_TOKENS * blocks


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"serving format must be one of {', '.join(FORMATS)}, not {fmt!r}")
