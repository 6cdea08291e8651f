"""The benchmark's arithmetic: FLOPs per token, TFLOP/s, MFU, medians, card names."""

import pytest

from gptoss_cloud.shapes import GPT_OSS_20B
from gptoss_cloud.trainer import bench_metrics as BM


def test_lora_with_recompute_is_six_n_and_full_is_eight_n():
    assert BM.flops_multiplier("lora", recompute=True) == 6  # issue 8's formula
    assert BM.flops_multiplier("full", recompute=True) == 8
    assert BM.flops_multiplier("lora", recompute=False) == 4
    assert BM.flops_multiplier("full", recompute=False) == 6  # the classic 6N without recompute
    with pytest.raises(ValueError, match="lora or full"):
        BM.flops_multiplier("qlora")


def test_issue_8_floor_numbers():
    # 20b: ~3.6 B active parameters; 37,000 tokens/s at ~800 TFLOP/s is the issue's floor.
    n = GPT_OSS_20B.active_params
    assert 3.5e9 < n < 3.7e9
    tflops = BM.model_tflops(n, 37_000, "lora")
    assert tflops == pytest.approx(6 * n * 37_000 / 1e12)
    assert 780 < tflops < 820
    # The measured transformers best case (7,690 tokens/s) on an H100's 989 TFLOP/s datasheet peak.
    m = BM.mfu(BM.model_tflops(n, 7_690, "lora"), 989.0)
    assert m == pytest.approx(6 * n * 7_690 / 1e12 / 989.0)
    assert 0.16 < m < 0.18


def test_mfu_unknown_peak_is_none():
    assert BM.mfu(100.0, None) is None
    assert BM.mfu(100.0, 0) is None
    assert BM.mfu(494.5, 989.0) == pytest.approx(0.5)


def test_median_and_ratio():
    assert BM.median([3.0, 1.0, 2.0]) == 2.0
    assert BM.median([1.0, 2.0, 10.0, 3.0]) == 2.5
    with pytest.raises(ValueError, match="no timed steps"):
        BM.median([])
    assert BM.ratio(19_000.0, 7_600.0) == pytest.approx(2.5)
    assert BM.ratio(None, 7_600.0) is None
    assert BM.ratio(19_000.0, None) is None


@pytest.mark.parametrize("name, family, peak", [
    ("NVIDIA H100 80GB HBM3", "H100", 989.0),
    ("NVIDIA H100 PCIe", "H100", 756.0),
    ("NVIDIA H200", "H200", 989.0),
    ("NVIDIA GH200 480GB", "GH200", 989.0),
    ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
    ("cpu", None, None),
])
def test_card_family(name, family, peak):
    assert BM.card_family(name) == (family, peak)


def test_card_slug_and_oom_label():
    assert BM.card_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert BM.card_slug("cpu") == "cpu"
    assert BM.card_slug("  ") == "unknown"
    assert BM.oom_label(71.234) == "OOM at 71.2 GiB"
    assert BM.oom_label(None) == "OOM"


def test_formula_is_stated():
    assert BM.flops_formula("lora").startswith("6 x active_params x tokens/s")
    assert "attention scores not counted" in BM.flops_formula("full")
