"""Long context in the spec and the planner: parallelism.activation_offload and kernels.moe_tile_tokens are
validated, planned (offloaded inputs on the host, the MoE working set following the tile), proposed when a
long sequence does not fit, and counted by the longest-sequence search."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from gptoss_cloud.contract.plan.activations import moe_bytes_per_token, offloaded_host_bytes
from gptoss_cloud.contract.plan.memory import _with, memory_plan, recompute_on
from gptoss_cloud.contract.plan.run import longest_seq
from gptoss_cloud.contract.plan.sizes import GiB
from gptoss_cloud.contract.sections import MAX_SEQ_LEN, KernelsSection, ParallelismSection
from gptoss_cloud.contract.shapes import GPT_OSS_20B
from gptoss_cloud.contract.spec import RunSpec

K512 = 524288


def _spec(seq=K512, gpu="H100", offload=False, tile=None, ac=True) -> RunSpec:
    """20b LoRA r=16 on attention, MXFP4 base, one GPU: what the context-512k suite runs."""
    return RunSpec.model_validate({
        "model": {"name": "20b", "init": "random", "base_format": "mxfp4"}, "method": {"kind": "lora"},
        "data": {"max_seq_len": seq}, "cluster": {"gpu_type": gpu},
        "parallelism": {"nodes": 1, "gpus_per_node": 1, "activation_checkpointing": ac, "activation_offload": offload},
        "kernels": {"moe_tile_tokens": tile},
    })


# ---------------------------------------------------------------------------------------------- spec
def test_activation_offload_needs_recomputation_and_turns_auto_on():
    with pytest.raises(ValidationError, match="activation_offload .* needs activation_checkpointing: true or auto"):
        ParallelismSection(activation_offload=True, activation_checkpointing=False)
    auto = _spec(seq=4096, offload=True, ac="auto")
    assert recompute_on(auto)  # 4K would fit without recomputation, but offloading is of its checkpoints
    assert not recompute_on(_spec(seq=4096, ac="auto"))


@pytest.mark.parametrize("bad", [0, -1, MAX_SEQ_LEN + 1, True, 1.5, "many"])
def test_moe_tile_must_be_a_positive_bounded_whole_number(bad):
    with pytest.raises(ValidationError, match="moe_tile_tokens"):
        KernelsSection(moe_tile_tokens=bad)


def test_moe_tile_defaults_off_and_takes_the_bounds():
    assert KernelsSection().moe_tile_tokens is None
    assert KernelsSection(moe_tile_tokens=1).moe_tile_tokens == 1
    assert KernelsSection(moe_tile_tokens=MAX_SEQ_LEN).moe_tile_tokens == MAX_SEQ_LEN


def test_the_starter_spec_lists_both_fields():
    from gptoss_cloud.starter import STARTER_SPEC

    assert "# activation_offload: false" in STARTER_SPEC and "# moe_tile_tokens: 32768" in STARTER_SPEC


# ---------------------------------------------------------------------------------------------- plan
def test_512k_needs_both_and_then_fits_76_gib():
    """The issue's target: 512K tokens inside 76 GiB (an 80 GB H100's usable memory)."""
    plain, off = memory_plan(_spec()), memory_plan(_spec(offload=True))
    tiled, both = memory_plan(_spec(tile=32768)), memory_plan(_spec(offload=True, tile=32768))
    assert both.gpu_capacity_gib == pytest.approx(76.0)
    assert not plain.fits and not off.fits and not tiled.fits and both.fits
    assert both.gpu_total_gib < off.gpu_total_gib < plain.gpu_total_gib and tiled.gpu_total_gib < plain.gpu_total_gib
    # The numbers docs/long-context.md quotes.
    assert (round(plain.gpu_total_gib, 1), round(both.gpu_total_gib, 1)) == (181.0, 67.3)


def test_offloaded_inputs_move_from_the_gpu_plan_to_the_host_plan():
    plain, off = memory_plan(_spec()), memory_plan(_spec(offload=True))
    h, L = GPT_OSS_20B.hidden_size, GPT_OSS_20B.num_hidden_layers
    assert plain.gpu["checkpointed layer inputs"] == pytest.approx(L * K512 * h * 2 / GiB, rel=1e-3)
    assert "checkpointed layer inputs" not in off.gpu
    assert off.gpu["offloaded layer input, one brought back"] == pytest.approx(K512 * h * 2 / GiB, rel=1e-3)
    host = off.host["offloaded activations (pinned, layer inputs + head)"]
    # every layer's input (bf16) + the final norm's fp32 input and output + the loss's bf16 gradient
    assert host == pytest.approx(K512 * h * (2 * L + 4 + 4 + 2) / GiB, rel=1e-3)
    assert off.host_total_gib - plain.host_total_gib == pytest.approx(host, abs=0.1)
    assert offloaded_host_bytes(GPT_OSS_20B, _spec()) == 0


def test_the_tiled_moe_working_set_follows_the_tile_not_the_sequence():
    def tile_part(seq, tile):
        gpu = memory_plan(_spec(seq=seq, offload=True, tile=tile), suggest=False).gpu
        return next(v for k, v in gpu.items() if k.startswith("MoE tile"))

    # Doubling the tile adds its MoE activations and their gradients (x2); doubling the sequence adds only
    # the tiled Function's whole-sequence output and input gradient (2 x hidden x bf16 per token).
    per_token = moe_bytes_per_token(GPT_OSS_20B) * 2 / GiB
    assert tile_part(K512, 65536) - tile_part(K512, 32768) == pytest.approx(32768 * per_token, rel=1e-3)
    io = 2 * GPT_OSS_20B.hidden_size * 2 / GiB
    assert tile_part(2 * K512, 32768) - tile_part(K512, 32768) == pytest.approx(K512 * io, rel=1e-3)
    # A tile that holds the whole micro-batch changes nothing.
    assert memory_plan(_spec(seq=16384, tile=32768)).gpu == memory_plan(_spec(seq=16384)).gpu


def test_suggestions_propose_offload_and_tiles_for_a_long_sequence():
    got = memory_plan(_spec()).suggestions
    assert any(s.startswith("parallelism.activation_offload: true + kernels.moe_tile_tokens: 32768 (67.3 GiB/GPU")
               for s in got), got
    # On an H200 offloading alone already fits 512K.
    assert any(s.startswith("parallelism.activation_offload: true (") for s in memory_plan(_spec(gpu="H200")).suggestions)
    # Never a setting the spec refuses: no offload without recomputation.
    assert not any("activation_offload" in s for s in memory_plan(_spec(ac=False)).suggestions)


def test_longest_sequence_with_the_long_context_settings():
    h100, h200 = longest_seq(_spec(gpu="H100")), longest_seq(_spec(gpu="H200"))
    assert h100.tokens < K512 <= h100.with_long_context          # 512K in 76 GiB only with them
    assert h200.tokens < 1 << 20 <= h200.with_long_context        # >= 1M on one H200
    assert h100.long_context_settings == {"parallelism.activation_offload": True, "kernels.moe_tile_tokens": 32768}
    both = longest_seq(_spec(gpu="H100", offload=True, tile=32768))
    assert both.tokens == h100.with_long_context and both.with_long_context is None and not both.long_context_settings
    at = memory_plan(_with(_spec(offload=True, tile=32768), data__max_seq_len=both.tokens), suggest=False)
    past = memory_plan(_with(_spec(offload=True, tile=32768), data__max_seq_len=both.tokens + 1024), suggest=False)
    assert at.fits and not past.fits


def test_the_longest_search_counts_the_host_once_activations_go_there():
    small_host = _with(_spec(gpu="H200", offload=True, tile=32768), cluster__host_memory_gib=64)
    ls = longest_seq(small_host)
    mp = memory_plan(_with(small_host, data__max_seq_len=ls.tokens), suggest=False)
    assert mp.host_total_gib <= mp.host_capacity_gib and mp.gpu_total_gib < 0.5 * mp.gpu_capacity_gib


def test_plan_longest_prints_the_length_with_the_long_context_settings(tmp_path):
    from typer.testing import CliRunner

    from gptoss_cloud.main import app

    path = tmp_path / "spec.yaml"
    path.write_text(_spec().to_yaml())
    r = CliRunner().invoke(app, ["plan", str(path), "--longest", "-o", "json"])
    got = json.loads(r.output)["longest_seq"]
    assert got["with_long_context"] >= K512 > got["tokens"]
    r = CliRunner().invoke(app, ["plan", str(path), "--longest"])
    assert "with parallelism.activation_offload: true, kernels.moe_tile_tokens: 32768" in r.output
