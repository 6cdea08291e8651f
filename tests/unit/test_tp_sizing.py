"""Serving sizes by format: the merged folder's bytes, what vLLM allocates per GPU (cli/contract/plan/vllm_memory.py
models vLLM 0.33 on Hopper; its sources are cited there), the KV cache of one sequence, and the TP each spec gets.

Expected numbers are worked out here by hand from the GPT-OSS dimensions (H = I = 2880, 64 query / 8 KV heads of 64,
vocabulary 201,088; 20b: 24 layers x 32 experts, 120b: 36 x 128), not read back from the code under test."""

import pytest

from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.contract.plan.serving import DEFAULT_KV_SEQUENCES, per_gpu, size_formats, size_tp, valid_tp, weight_bytes
from gptoss_cloud.contract.plan.vllm_memory import (
    GiB, checkpoint_bytes, dense_bytes_per_gpu, expert_bytes_per_gpu, expert_intermediate_per_rank, in_flight_tokens,
    kv_bytes_per_sequence, weight_bytes_per_gpu,
)
from gptoss_cloud.contract.deploy_sections import ServeSection
from gptoss_cloud.contract.shapes import GPT_OSS_20B, GPT_OSS_120B, TINY

H100, H200 = 80, 141          # the catalog's GiB (contract/plan/gpus.py)
H100_CUDA = 79.1              # what an H100 80GB reports to CUDA (torch total_memory; backends/local.py rounds it so)


# ------------------------------------------------------------------------------------------ the checkpoint
def test_bf16_weights_match_the_published_sizes():
    assert 233e9 < weight_bytes(GPT_OSS_120B) < 235e9  # "a bf16 120b is ~234 GB"
    assert 41e9 < weight_bytes(GPT_OSS_20B) < 43e9


@pytest.mark.parametrize("shape,layers,experts,card_gib", [(GPT_OSS_20B, 24, 32, 12.8), (GPT_OSS_120B, 36, 128, 60.8)])
def test_mxfp4_checkpoint_is_4_25_bits_per_expert_weight_and_matches_the_model_card(shape, layers, experts, card_gib):
    matrices = layers * experts * (2880 * 5760 + 2880 * 2880)          # gate_up + down, no biases
    rest = shape.total_params - matrices                               # attention, embeddings, router, norms, expert biases
    assert checkpoint_bytes(shape, "mxfp4") == matrices * 4.25 / 8 + rest * 2
    # The gpt-oss model card (Table 1, "checkpoint size") gives 12.8 and 60.8 GiB, to 0.1 GiB: within 0.05.
    assert checkpoint_bytes(shape, "mxfp4") / GiB == pytest.approx(card_gib, abs=0.05)
    assert checkpoint_bytes(shape, "bf16") == shape.total_params * 2
    with pytest.raises(ValueError, match="nvfp4"):
        checkpoint_bytes(shape, "nvfp4")


# ------------------------------------------------------------------------------------------- per GPU
def test_everything_but_the_experts_is_bf16_and_split_like_models_gpt_oss():
    # At TP 1 nothing is padded (201,088 is a multiple of 64) or replicated: the shape's own count, in bf16.
    for shape in (GPT_OSS_20B, GPT_OSS_120B):
        assert dense_bytes_per_gpu(shape, 1) == (shape.total_params - shape.expert_params_total) * 2
    # At TP 8 each rank keeps 1/8 of embedding, LM head and attention, and the replicated router, norms, o_proj bias.
    L, h = 36, 2880
    per_layer = (h * 512 + 512) + 2 * (h * 64 + 64) + 512 * h + h + 8 + (h * 128 + 128) + 2 * h
    assert dense_bytes_per_gpu(GPT_OSS_120B, 8) == (L * per_layer + 2 * 25136 * h + h) * 2


def test_mxfp4_experts_at_tp1_are_the_checkpoint_plus_hopper_scale_padding_and_fp32_biases():
    # Per expert: w13 codes 5760 rows x 1440 bytes, scales rows 5760 -> 5888 (256) x groups 90 -> 92 (4 on SM90);
    # w2 codes 2880 x 1440, scales 2880 -> 3072 x 92; biases (5760 + 2880) in float32.
    per_expert = 5760 * 1440 + 5888 * 92 + 2880 * 1440 + 3072 * 92 + (5760 + 2880) * 4
    assert expert_bytes_per_gpu(GPT_OSS_120B, "mxfp4", 1) == 36 * 128 * per_expert
    assert expert_bytes_per_gpu(GPT_OSS_20B, "mxfp4", 1) == 24 * 32 * per_expert


def test_mxfp4_pads_the_per_rank_intermediate_size_to_64_at_tp2():
    assert [expert_intermediate_per_rank(GPT_OSS_120B, "mxfp4", t) for t in (1, 2, 4, 8)] == [2880, 1472, 768, 384]
    assert [expert_intermediate_per_rank(GPT_OSS_120B, "bf16", t) for t in (1, 2, 4, 8)] == [2880, 1440, 720, 360]
    # TP 2: w13 2944 rows (scales to 3072) x 1440 bytes / 92 groups; w2 2880 (3072) rows x 736 bytes / 46 -> 48 groups.
    per_expert = 2944 * 1440 + 3072 * 92 + 2880 * 736 + 3072 * 48 + (2944 + 2880) * 4
    assert expert_bytes_per_gpu(GPT_OSS_120B, "mxfp4", 2) == 36 * 128 * per_expert


def test_bf16_experts_split_evenly_with_w2_bias_on_every_rank():
    for tp in (1, 2, 4, 8):
        i = 2880 // tp
        per_expert = (2 * i * 2880 + 2880 * i) * 2 + (2 * i + 2880) * 2
        assert expert_bytes_per_gpu(GPT_OSS_120B, "bf16", tp) == 36 * 128 * per_expert


# --------------------------------------------------------------------------------------------- KV cache
def test_kv_of_one_sequence_counts_what_vllm_admits():
    # 8 KV heads x 64 dims, bf16 K and V: 2048 bytes per token per layer. Sliding layers hold the window less one
    # (127) plus 2 x 8192 in-flight tokens on an 80 GB card, in whole 16-token blocks plus one: 16,511 -> 1,033 blocks.
    assert in_flight_tokens(H100) == in_flight_tokens(H200) == 16384 and in_flight_tokens(40) == 4096
    assert kv_bytes_per_sequence(GPT_OSS_20B, 32768, in_flight=16384) == 2048 * 16 * (12 * 2048 + 12 * 1033)
    assert kv_bytes_per_sequence(GPT_OSS_120B, 32768, in_flight=16384) == 2048 * 16 * (18 * 2048 + 18 * 1033)
    # short: every layer holds the whole sequence, the sliding ones one block more
    assert kv_bytes_per_sequence(GPT_OSS_120B, 4096, in_flight=16384) == 2048 * 16 * (18 * 256 + 18 * 257)
    assert kv_bytes_per_sequence(GPT_OSS_120B, 32768, tp=8, in_flight=16384) * 8 == kv_bytes_per_sequence(
        GPT_OSS_120B, 32768, in_flight=16384)                                                 # one KV head per rank
    assert kv_bytes_per_sequence(GPT_OSS_20B, 32768) == 2048 * 16 * (12 * 2048 + 12 * 9)       # no in-flight: the window


# ------------------------------------------------------------------------------------------- TP by format
@pytest.mark.parametrize("shape,fmt,gib,tp", [
    (GPT_OSS_20B, "bf16", H100, 1),
    (GPT_OSS_20B, "mxfp4", H100, 1),
    (GPT_OSS_20B, "bf16", H200, 1),
    (GPT_OSS_20B, "mxfp4", H200, 1),
    (GPT_OSS_120B, "bf16", H100, 4),    # 217.6 GiB of weights: TP 2 leaves no room, TP 4 does
    (GPT_OSS_120B, "bf16", H200, 2),
    (GPT_OSS_120B, "mxfp4", H100, 1),   # the release's single-GPU serving
    (GPT_OSS_120B, "mxfp4", H200, 1),
    (GPT_OSS_20B, "bf16", 24, 4),
    (GPT_OSS_20B, "mxfp4", 24, 1),
    (TINY, "bf16", 16, 1),
])
def test_smallest_power_of_two_that_fits(shape, fmt, gib, tp):
    sized = size_tp(shape, gpu_memory_gib=gib, fmt=fmt)
    assert sized.tp == tp and sized.fits and sized.fmt == fmt
    if tp > 1:  # and the next smaller one really does not fit
        assert not per_gpu(shape, tp // 2, gpu_memory_gib=gib, utilization=0.9, max_model_len=32768, fmt=fmt).fits


def test_120b_mxfp4_serves_on_one_80gb_gpu_with_the_arithmetic_of_docs_serving_sizes():
    s = size_tp(GPT_OSS_120B, gpu_memory_gib=H100, fmt="mxfp4")
    assert s.tp == 1
    assert s.weights_per_gpu_gib == pytest.approx(61.04, abs=0.01)    # 57.33 GB codes + 3.80 scales + 0.16 biases + 4.25 rest
    assert s.kv_seq_gib == pytest.approx(2048 * 16 * 18 * (2048 + 1033) / GiB)   # 1.69 GiB
    assert s.budget_gib == 72.0 and s.per_gpu_gib == pytest.approx(61.04 + 2 * 1.69 + 4, abs=0.02)
    assert s.sequences_held == 4                                       # (72 - 61.04 - 4) / 1.69 = 4.1
    on_cuda = size_tp(GPT_OSS_120B, gpu_memory_gib=H100_CUDA, fmt="mxfp4")
    assert on_cuda.tp == 1 and on_cuda.sequences_held == 3             # (71.19 - 61.04 - 4) / 1.69 = 3.6


def test_the_default_kv_target_is_the_spec_field_default():
    assert DEFAULT_KV_SEQUENCES == ServeSection().kv_sequences == 2


def test_more_memory_never_needs_more_gpus():
    for fmt in ("bf16", "mxfp4"):
        tps = [size_tp(GPT_OSS_120B, gpu_memory_gib=g, fmt=fmt).tp for g in (40, 48, 80, 96, 141, 192, 288)]
        assert tps == sorted(tps, reverse=True)


def test_lower_utilization_longer_context_or_more_sequences_can_need_more_gpus():
    assert size_tp(GPT_OSS_20B, gpu_memory_gib=64, utilization=0.9).tp == 1
    assert size_tp(GPT_OSS_20B, gpu_memory_gib=64, utilization=0.6).tp == 2
    assert size_tp(GPT_OSS_20B, gpu_memory_gib=48, max_model_len=131072).tp > 1
    assert size_tp(GPT_OSS_120B, gpu_memory_gib=H100, fmt="mxfp4", kv_sequences=8).tp == 2


def test_both_formats_side_by_side():
    both = size_formats(GPT_OSS_120B, gpu_memory_gib=H100)
    assert (both["bf16"].tp, both["mxfp4"].tp) == (4, 1)
    assert both["mxfp4"].to_dict()["weights_gib"] == pytest.approx(60.77, abs=0.01)
    small = size_formats(GPT_OSS_120B, gpu_memory_gib=16)
    assert isinstance(small["bf16"], GptossError) and small["mxfp4"].tp == 8


def test_tp_must_split_heads_and_experts_evenly():
    assert valid_tp(GPT_OSS_120B, 8) and valid_tp(GPT_OSS_120B, 16)  # 64 heads; KV heads replicated past 8
    assert not valid_tp(GPT_OSS_120B, 3) and not valid_tp(TINY, 8)    # tiny has 4 heads


def test_nothing_fits_is_a_clear_error_with_numbers():
    with pytest.raises(GptossError) as e:
        size_tp(GPT_OSS_120B, gpu_memory_gib=16)
    assert "does not fit" in str(e.value) and "TP=8" in str(e.value) and "GiB" in str(e.value)
    assert "output.merge_format: mxfp4" in e.value.hint              # bf16 that does not fit: the smaller format
    with pytest.raises(GptossError):
        size_tp(GPT_OSS_20B, gpu_memory_gib=0)


def test_weights_that_fit_with_too_little_kv_name_the_knob():
    # 14 GiB cards: TP 8 holds 8.2 GiB of MXFP4 weights + 4 GiB overhead, 0.4 GiB short of KV for 2 x 65,536 tokens.
    with pytest.raises(GptossError) as e:
        size_tp(GPT_OSS_120B, gpu_memory_gib=14, max_model_len=65536, fmt="mxfp4")
    assert "KV for 2 full-length sequences" in e.value.message and "holds 1" in e.value.message
    assert "serve.kv_sequences to 1" in e.value.hint and "serve.max_model_len" in e.value.hint
    assert size_tp(GPT_OSS_120B, gpu_memory_gib=14, max_model_len=65536, fmt="mxfp4", kv_sequences=1).tp == 8
