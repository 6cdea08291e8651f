"""Merge tiny full and LoRA checkpoints into servable folders; transformers loads them with equal logits."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from ckpt_worker import DataPosition, build_model  # noqa: E402
from gptoss_cloud.spec import RunSpec  # noqa: E402
from gptoss_cloud.store import open_store  # noqa: E402
from gptoss_cloud.trainer.checkpoint import Checkpointer  # noqa: E402
from gptoss_cloud.trainer.merge import harmony_prompts, merge  # noqa: E402


def _trained_run(home: str, method: str):
    spec = RunSpec.model_validate({"method": {"kind": method}})
    model = build_model(method)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    state = {"model": model, "optimizer": opt, "data": DataPosition(1, 0)}
    ck = Checkpointer(spec.checkpoint, home, spec=spec)
    assert ck.restore(state) == 0
    for step in (1, 2):
        ids = state["data"].next_batch(8, 256)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    ck.save(2, state)
    ck.close()
    return model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def _check_servable(out: pathlib.Path, dtype: str):
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["GptOssForCausalLM"] and "quantization_config" not in cfg and cfg["dtype"] == dtype
    assert (out / "generation_config.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    from safetensors import safe_open

    seen = {}
    for f in set(index["weight_map"].values()):
        with safe_open(str(out / f), framework="pt") as h:
            seen.update({k: f for k in h.keys()})
    assert seen == index["weight_map"]  # the index is complete and exact
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).is_file(), name


@pytest.mark.parametrize("method", ["full", "lora"])
def test_merge_loads_in_transformers_with_equal_logits(method, tmp_path):
    from transformers import AutoTokenizer, GptOssForCausalLM

    home = tmp_path / "run"
    trained = _trained_run(str(home), method)
    if method == "lora":
        assert open_store(str(home)).exists("base/model.safetensors")  # random base kept for the merge
    out = home / "merged"
    res = merge(str(home), str(out), verify=True, shard_bytes=200_000)  # small shards: exercise the index
    assert res.step == 2 and res.method == method and len(res.shards) > 1
    assert res.max_abs_logit_diff is not None and res.max_abs_logit_diff < 1e-4
    _check_servable(out, "float32")
    merged = GptOssForCausalLM.from_pretrained(str(out), dtype=torch.float32, attn_implementation="eager").eval()
    for ids in harmony_prompts(256):
        torch.testing.assert_close(_logits(merged, ids), _logits(trained, ids), rtol=1e-5, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.convert_tokens_to_ids("<|start|>") == 200006
    if method == "lora":
        from peft import PeftModel

        assert res.adapter_out == str(home / "adapter")
        base = GptOssForCausalLM.from_pretrained(str(home / "base"), dtype=torch.float32, attn_implementation="eager")
        again = PeftModel.from_pretrained(base, res.adapter_out).eval()
        ids = harmony_prompts(256)[0]
        torch.testing.assert_close(_logits(again, ids), _logits(trained, ids), rtol=1e-5, atol=1e-5)


def test_merge_writes_straight_to_s3_in_bf16(tmp_path, s3_bucket):
    home = f"{s3_bucket}/run-full"
    _trained_run(home, "full")
    out = f"{s3_bucket}/run-full/merged"
    res = merge(home, out, dtype="bfloat16")
    keys = open_store(out).list("")
    assert "model.safetensors.index.json" in keys and "config.json" in keys and "tokenizer.json" in keys
    assert set(res.shards) <= set(keys)
    cfg = json.loads(open_store(out).read_bytes("config.json"))
    assert cfg["dtype"] == "bfloat16" and "quantization_config" not in cfg
