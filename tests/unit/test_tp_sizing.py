import pytest

from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.contract.plan.serving import kv_bytes_per_sequence, per_gpu, size_tp, valid_tp, weight_bytes
from gptoss_cloud.contract.shapes import GPT_OSS_20B, GPT_OSS_120B, TINY


def test_bf16_weights_match_the_published_sizes():
    assert 233e9 < weight_bytes(GPT_OSS_120B) < 235e9  # "a bf16 120b is ~234 GB"
    assert 41e9 < weight_bytes(GPT_OSS_20B) < 43e9


@pytest.mark.parametrize("shape,gib,tp", [
    (GPT_OSS_120B, 80, 4),    # 234 GB of weights: TP 2 leaves no room, TP 4 does
    (GPT_OSS_120B, 141, 2),   # H200
    (GPT_OSS_20B, 80, 1),
    (GPT_OSS_20B, 24, 4),
    (TINY, 16, 1),
])
def test_smallest_power_of_two_that_fits(shape, gib, tp):
    sized = size_tp(shape, gpu_memory_gib=gib)
    assert sized.tp == tp and sized.fits
    if tp > 1:  # and the next smaller one really does not fit
        assert not per_gpu(shape, tp // 2, gpu_memory_gib=gib, utilization=0.9, max_model_len=32768).fits


def test_more_memory_never_needs_more_gpus():
    tps = [size_tp(GPT_OSS_120B, gpu_memory_gib=g).tp for g in (40, 48, 80, 96, 141, 192, 288)]
    assert tps == sorted(tps, reverse=True)


def test_lower_utilization_or_longer_context_can_need_more_gpus():
    assert size_tp(GPT_OSS_20B, gpu_memory_gib=64, utilization=0.9).tp == 1
    assert size_tp(GPT_OSS_20B, gpu_memory_gib=64, utilization=0.6).tp == 2
    assert size_tp(GPT_OSS_20B, gpu_memory_gib=64, max_model_len=131072).tp > 1


def test_sliding_window_layers_hold_only_their_window():
    # 12 full + 12 sliding layers of 8 KV heads x 64 dims, bf16 K and V: 2048 bytes per token per layer
    assert kv_bytes_per_sequence(GPT_OSS_20B, 32768) == 2048 * (12 * 32768 + 12 * 128)


def test_tp_must_split_heads_evenly():
    assert valid_tp(GPT_OSS_120B, 8) and valid_tp(GPT_OSS_120B, 16)  # 64 heads; KV heads replicated past 8
    assert not valid_tp(GPT_OSS_120B, 3) and not valid_tp(TINY, 8)    # tiny has 4 heads


def test_nothing_fits_is_a_clear_error_with_numbers():
    with pytest.raises(GptossError) as e:
        size_tp(GPT_OSS_120B, gpu_memory_gib=16)
    assert "does not fit" in str(e.value) and "TP=8" in str(e.value) and "GiB" in str(e.value)
    with pytest.raises(GptossError):
        size_tp(GPT_OSS_20B, gpu_memory_gib=0)
