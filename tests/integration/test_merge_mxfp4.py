"""The MXFP4 export (`merge --format mxfp4`) over a tiny base published as openai/gpt-oss-20b is: the
published layout, byte-exact copies of experts nothing trained, quantised experts otherwise, loaded by
transformers with the logits the derivations below promise, and bad bases refused by name."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from mxfp4_base import full_run, lora_run, read_folder, write_published_base  # noqa: E402

from gptoss_cloud.contract.errors import GptossError  # noqa: E402
from gptoss_cloud.trainer.kernels.mxfp4 import dequantize_expert_weight  # noqa: E402
from gptoss_cloud.trainer.merge.export import merge  # noqa: E402
from gptoss_cloud.trainer.merge.mxfp4 import QUANTIZATION_CONFIG, is_expert_weight  # noqa: E402
from gptoss_cloud.trainer.merge.verify import as_exported_mxfp4, harmony_prompts, load_merged  # noqa: E402

PACKED = ("_blocks", "_scales")


def _logits(model, vocab: int = 1024) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=torch.tensor([ids])).logits[0] for ids in harmony_prompts(vocab)])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[pathlib.Path, dict]:
    folder = tmp_path_factory.mktemp("published") / "gpt-oss-tiny"
    return folder, write_published_base(folder)


def test_untrained_experts_are_the_base_bytes_and_transformers_loads_them(base, tmp_path):
    """LoRA on attention and the router over an MXFP4 base: the export is the published layout tensor for
    tensor (names, shapes, dtypes), every expert block and scale byte-identical to the base's (copied, never
    requantised), and the model transformers loads from it is the bf16 merge's, weight for weight."""
    folder, stored = base
    home = tmp_path / "run"
    lora_run(home, folder)
    mx = merge(str(home), str(home / "merged-mxfp4"), fmt="mxfp4", base=str(folder))
    dense = merge(str(home), str(home / "merged"), fmt="bf16", base=str(folder), dtype="bfloat16")
    assert mx.format == "mxfp4" and mx.stats()["format"] == "mxfp4" and mx.adapter_out == str(home / "adapter")
    assert dense.adapter_out == str(home / "adapter")
    got = read_folder(home / "merged-mxfp4")
    assert {k: (tuple(v.shape), v.dtype) for k, v in got.items()} == {k: (tuple(v.shape), v.dtype) for k, v in stored.items()}
    packed = [k for k in got if k.endswith(PACKED)]
    assert len(packed) == 2 * 2 * 2  # 2 layers x {gate_up, down} x {blocks, scales}
    assert all(torch.equal(got[k], stored[k]) for k in packed)
    assert all(got[k].dtype == torch.bfloat16 for k in got if not k.endswith(PACKED))
    changed = {k for k in got if not k.endswith(PACKED) and not torch.equal(got[k], stored[k])}
    assert changed == {f"model.layers.{i}.{m}.weight" for i in range(2) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.router")}
    cfg = json.loads((home / "merged-mxfp4" / "config.json").read_text())
    assert cfg["quantization_config"] == QUANTIZATION_CONFIG and cfg["dtype"] == "bfloat16"
    assert cfg["architectures"] == ["GptOssForCausalLM"] and (home / "merged-mxfp4" / "tokenizer.json").is_file()
    assert mx.bytes_written < dense.bytes_written and mx.total_bytes == sum(v.numel() * v.element_size() for v in got.values())

    a, b = load_merged(home / "merged-mxfp4"), load_merged(home / "merged")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:  # the same weights: transformers' dequantisation of the copied bytes is the bf16 merge's
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)
    for i in range(2):  # ... and our own decoder's, independently of transformers
        for w in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{i}.mlp.experts.{w}"
            ours = dequantize_expert_weight(stored[name + "_blocks"], stored[name + "_scales"], torch.float32)
            torch.testing.assert_close(sa[name], ours, rtol=0, atol=0)
    # Identical weights through the same CPU kernels: identical logits.
    torch.testing.assert_close(_logits(a), _logits(b), rtol=0, atol=0)


def test_trained_experts_are_quantised_and_load_with_the_stated_error(base, tmp_path, capsys):
    """A full fine-tune: its experts are quantised. transformers' load of the export equals, weight for
    weight, the fp32 merge with each expert weight replaced by dequant(quant(w)) and every other tensor
    rounded to bf16, so the logits match exactly; the gap to the unquantised merge is the quantisation
    error itself, reported. --verify (fp32 non-experts) checks the same against the training-time model."""
    folder, stored = base
    home = tmp_path / "run"
    full_run(home, folder)
    mx = merge(str(home), str(home / "merged-mxfp4"), fmt="mxfp4")
    fp32 = merge(str(home), str(home / "fp32"), fmt="bf16", dtype="float32")
    got = read_folder(home / "merged-mxfp4")
    assert {k: (tuple(v.shape), v.dtype) for k, v in got.items()} == {k: (tuple(v.shape), v.dtype) for k, v in stored.items()}
    assert not any(torch.equal(got[k], stored[k]) for k in got if k.endswith("_blocks"))  # trained, so requantised
    exported, unquantised = load_merged(home / "merged-mxfp4"), load_merged(home / "fp32")
    reference = load_merged(home / "fp32")
    with torch.no_grad():
        for n, p in reference.named_parameters():
            if not is_expert_weight(n):
                p.copy_(p.to(torch.bfloat16))
    as_exported_mxfp4(reference)
    se, sr = exported.state_dict(), reference.state_dict()
    for k in se:
        torch.testing.assert_close(se[k], sr[k], rtol=0, atol=0, msg=k)
    le, lu = _logits(exported), _logits(unquantised)
    torch.testing.assert_close(le, _logits(reference), rtol=0, atol=0)
    gap = (le - lu).abs().max().item()
    # Quantisation moves each expert weight by up to one e2m1 step (<= 1/3 of its group's largest
    # magnitude): the logits move, but stay the same model's (well under their own spread).
    assert 0 < gap < 0.5 * lu.std().item(), (gap, lu.std().item())
    with capsys.disabled():
        print(f"\ntiny MXFP4 export: max |logit diff| vs the unquantised merge {gap:.4f} (logit std {lu.std().item():.3f}); "
              f"weights {mx.total_bytes} bytes vs {fp32.total_bytes} in fp32")
    checked = merge(str(home), str(tmp_path / "verified"), fmt="mxfp4", dtype="float32", verify=True)
    assert checked.max_abs_logit_diff is not None and checked.max_abs_logit_diff < 1e-4


def test_only_the_experts_an_adapter_touched_are_requantised(base, tmp_path):
    """LoRA on layer 1's experts: layer 1's blocks and scales are new, layer 0's are the base's bytes."""
    folder, stored = base
    home = tmp_path / "run"
    lora_run(home, folder, expert_layers=[1])
    merge(str(home), str(home / "merged-mxfp4"), fmt="mxfp4", base=str(folder))
    got = read_folder(home / "merged-mxfp4")
    same = {k for k in got if k.endswith(PACKED) and torch.equal(got[k], stored[k])}
    assert {k for k in same if k.endswith("_blocks")} == {f"model.layers.0.mlp.experts.{w}_blocks" for w in ("gate_up_proj", "down_proj")}
    assert not any(k.startswith("model.layers.1.") and k.endswith("_blocks") for k in same)


def test_a_base_whose_blocks_and_scales_disagree_is_refused_by_name(base, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _ = base
    bad = tmp_path / "bad-base"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    shard = bad / "model-00000-of-00002.safetensors"
    sd = load_file(str(shard))
    name = "model.layers.0.mlp.experts.down_proj_scales"
    sd[name] = sd[name][:, :-1].contiguous()  # one row of scales short
    save_file(sd, str(shard), metadata={"format": "pt"})
    home = tmp_path / "run"
    lora_run(home, folder)
    with pytest.raises(GptossError, match=r"down_proj_blocks \(4, 64, 2, 16\) does not match .*down_proj_scales \(4, 63, 2\)") as e:
        merge(str(home), str(tmp_path / "out"), fmt="mxfp4", base=str(bad))
    assert str(shard) in str(e.value)
    assert not (tmp_path / "out" / "config.json").exists()  # refused before anything was published


def test_a_width_that_is_not_a_multiple_of_32_is_refused_by_name(tmp_path):
    from mxfp4_base import tiny_config

    from gptoss_cloud.contract.spec import RunSpec
    from gptoss_cloud.trainer.checkpoint.checkpointer import Checkpointer
    from transformers import GptOssForCausalLM

    model = GptOssForCausalLM(tiny_config(hidden_size=48)).float()
    spec = RunSpec.model_validate({"method": {"kind": "full"}})
    home = tmp_path / "run"
    Checkpointer(spec.checkpoint, str(home), spec=spec, record_metrics=False).save(1, {"model": model})
    with pytest.raises(GptossError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj \(4, 48, 128\) has 48 input "
                                          r"features, not a multiple of 32") as e:
        merge(str(home), str(tmp_path / "out"), fmt="mxfp4")
    assert "checkpoints/step-1" in str(e.value) and "--format bf16" in e.value.hint
    assert merge(str(home), str(tmp_path / "dense"), fmt="bf16").format == "bf16"  # the bf16 merge still serves it
