"""The merged-model folder names and what ``output.merge_format: auto`` writes (cli/contract/runs.py), and the
spec's refusal of quantisation-aware training over frozen experts."""

from __future__ import annotations

import pytest

from gptoss_cloud.contract.runs import merge_formats, merged_key
from gptoss_cloud.contract.spec import RunSpec


def test_folder_names():
    assert merged_key() == "merged"
    assert merged_key("mxfp4") == "merged-mxfp4"
    assert merged_key("bf16", 40) == "merged-step-40"
    assert merged_key("mxfp4", 40) == "merged-step-40-mxfp4"
    with pytest.raises(ValueError, match="nvfp4"):
        merged_key("nvfp4")


@pytest.mark.parametrize("fmt,trained,qat,base_mxfp4,want", [
    ("auto", False, "none", True, ("mxfp4",)),    # frozen MXFP4 experts: their bytes are copied, nothing lost
    ("auto", False, "none", False, ("bf16",)),    # frozen bf16 experts would be rounded: keep bf16
    ("auto", True, "none", True, ("bf16",)),      # trained without QAT: the 4-bit rounding was never trained for
    ("auto", True, "mxfp4", False, ("mxfp4",)),   # trained as served
    ("bf16", False, "none", True, ("bf16",)),
    ("mxfp4", True, "none", False, ("mxfp4",)),
    ("both", True, "none", False, ("bf16", "mxfp4")),
])
def test_auto_writes_mxfp4_only_when_lossless(fmt, trained, qat, base_mxfp4, want):
    assert merge_formats(fmt, experts_trained=trained, qat=qat, base_mxfp4=base_mxfp4) == want


def test_qat_needs_trainable_experts():
    with pytest.raises(ValueError, match="lora.experts: true"):
        RunSpec.model_validate({"method": {"kind": "lora", "qat": "mxfp4"}})
    assert RunSpec.model_validate({"method": {"kind": "lora", "qat": "mxfp4", "lora": {"experts": True}}}).method.qat == "mxfp4"
    assert RunSpec.model_validate({"method": {"kind": "full", "qat": "mxfp4"}}).method.qat == "mxfp4"


def test_one_rule_says_whether_a_base_holds_mxfp4():
    from gptoss_cloud.contract.merged import base_is_mxfp4, holds_mxfp4

    published = {"quantization_config": {"quant_method": "mxfp4"}}
    packed = ["model.layers.0.mlp.experts.gate_up_proj_blocks", "model.layers.0.mlp.experts.gate_up_proj_scales"]
    assert holds_mxfp4(published)                   # the published checkpoints declare it
    assert holds_mxfp4({}, packed)                  # a random base kept in MXFP4 only packs it
    assert not holds_mxfp4({}, ["model.layers.0.mlp.experts.gate_up_proj"])
    assert not holds_mxfp4(None)
    lora = RunSpec.model_validate({"model": {"name": "tiny"}, "method": {"kind": "lora"}})
    assert base_is_mxfp4(lora, {}, packed) and not base_is_mxfp4(lora)   # known base/ first, else the preset rule
