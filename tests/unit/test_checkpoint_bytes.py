"""One checkpoint-size formula: bytes per trainable parameter pinned for each method, dtype and optimizer, and the
trainer's disk preflight using the planner's number (they once disagreed by 2x for a bf16 full fine-tune)."""

from __future__ import annotations

import pytest
from gptoss_cloud.contract.plan.disk import checkpoint_bytes
from gptoss_cloud.contract.plan.sizes import lora_params
from gptoss_cloud.contract.shapes import GPT_OSS_20B
from gptoss_cloud.contract.spec import RunSpec
from gptoss_cloud.trainer.checkpoint import room

METADATA = 1e6  # scheduler, data position, RNG states and the manifest: a fixed allowance
MOMENTS_8BIT = 2 * (1 + 4 / 256)  # Adam's m and v: a uint8 code per element plus an fp32 scale per 256


def _spec(method: str, dtype: str, name: str, masters: str) -> RunSpec:
    return RunSpec.model_validate({"model": {"name": "20b", "dtype": dtype}, "method": {"kind": method},
                                   "optim": {"name": name, "master_weights": masters}})


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name,masters,per_param", [
    ("adamw", "fp32", 4 + 2 * 4),              # fp32 master + fp32 m and v, whatever the compute dtype
    ("adamw_8bit", "fp32", 4 + MOMENTS_8BIT),
    ("adamw_8bit", "bf16", 2 + MOMENTS_8BIT),
])
def test_bytes_per_trainable_parameter(method, dtype, name, masters, per_param):
    spec = _spec(method, dtype, name, masters)
    trainable = GPT_OSS_20B.total_params if method == "full" else lora_params(GPT_OSS_20B, spec.method.lora)
    assert (checkpoint_bytes(GPT_OSS_20B, spec) - METADATA) / trainable == pytest.approx(per_param, rel=1e-12)
    # The trainer's preflight asks the same formula, not a copy of it.
    assert room.checkpoint_bytes(spec, GPT_OSS_20B) == checkpoint_bytes(GPT_OSS_20B, spec)


def test_a_bf16_full_fine_tune_of_20b_checkpoints_at_twelve_bytes_a_parameter():
    spec = _spec("full", "bfloat16", "adamw", "fp32")
    assert checkpoint_bytes(GPT_OSS_20B, spec) / 1e9 == pytest.approx(GPT_OSS_20B.total_params * 12 / 1e9, abs=0.01)
