"""Merge tiny full and LoRA checkpoints into servable folders; transformers loads them with equal logits."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from ckpt_worker import DataPosition, build_model  # noqa: E402
from gptoss_cloud.contract.spec import RunSpec  # noqa: E402
from gptoss_cloud.contract.store.objects import open_store  # noqa: E402
from gptoss_cloud.trainer.checkpoint.checkpointer import Checkpointer  # noqa: E402
from gptoss_cloud.trainer.merge.export import merge
from gptoss_cloud.trainer.merge.verify import harmony_prompts


def _trained_run(home: str, method: str, declared: torch.dtype | None = None):
    spec = RunSpec.model_validate({"method": {"kind": method}})
    if method == "lora":
        # The trainer keeps a LoRA run's random base in <home>/base/ before the adapter goes on.
        from gptoss_cloud.trainer.train import save_base

        save_base(build_model("full"), home)
    model = build_model(method)
    if declared is not None:  # as create_model records it: a GPU run computes in bf16 over fp32 masters
        model.config.dtype = declared
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
    assert cfg["use_cache"] is True and cfg["transformers_version"]   # served models generate
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


def test_full_merge_defaults_to_the_dtype_the_run_computed_in(tmp_path):
    """fp32 master weights of a bf16 run merge to bf16 (half the bytes vLLM loads); --dtype still wins."""
    from safetensors import safe_open

    home = tmp_path / "run"
    _trained_run(str(home), "full", declared=torch.bfloat16)
    res = merge(str(home), str(home / "merged"))
    _check_servable(home / "merged", "bfloat16")
    with safe_open(str(home / "merged" / res.shards[0]), framework="pt") as h:
        assert {h.get_slice(k).get_dtype() for k in h.keys()} == {"BF16"}
    again = merge(str(home), str(tmp_path / "fp32"), dtype="float32")
    _check_servable(tmp_path / "fp32", "float32")
    assert again.total_bytes == 2 * res.total_bytes


MEASURE = r"""
import sys, tempfile, pathlib
import torch
from gptoss_cloud.trainer.merge import base as mb, export as m, sink as ms

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

home, out = sys.argv[1], sys.argv[2]
with tempfile.TemporaryDirectory() as tmp:
    src = mb.Source(home, pathlib.Path(tmp))
    sink = ms.Sink(out, pathlib.Path(tmp))
    src.load([next(iter(src.model_entries()))])  # warm up DCP's code paths before measuring
    before = rss("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    res = m._merge_full(src, sink, {}, None, 10**9)
    print(rss("VmHWM") - before, res.total)
"""


def test_full_merge_peak_memory_is_a_few_tensors_not_the_model(tmp_path):
    """Peak host memory of the streaming merge stays within a small multiple of the largest tensor."""
    import subprocess
    from dataclasses import replace

    from transformers import GptOssConfig, GptOssForCausalLM

    from gptoss_cloud.contract.shapes import TINY

    shape = replace(TINY, vocab_size=32768, hidden_size=256, intermediate_size=512, num_local_experts=32,
                    num_hidden_layers=8, head_dim=32, max_position_embeddings=4096)
    kw = shape.hf_config_dict()
    kw.update(pad_token_id=0, eos_token_id=1)
    model = GptOssForCausalLM(GptOssConfig(**kw))
    spec = RunSpec.model_validate({"method": {"kind": "full"}})
    home = tmp_path / "big"
    Checkpointer(spec.checkpoint, str(home), spec=spec).save(1, {"model": model})
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    r = subprocess.run([sys.executable, "-c", MEASURE, str(home), str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    peak, written = map(int, r.stdout.split()[-2:])
    assert written == total
    assert total > 10 * largest  # the model is big enough for the bound to mean something
    # DCP's reader holds the bytes read, the tensor torch.load makes of them and the destination: ~3x.
    assert peak < 4 * largest, f"peak {peak / 2**20:.0f} MiB vs largest tensor {largest / 2**20:.0f} MiB, model {total / 2**20:.0f} MiB"


def test_merge_cli_by_run_id(tmp_path):
    import subprocess

    store = tmp_path / "runs"
    home = store / "demo-20260101-000000-abcd"
    _trained_run(str(home), "full")
    (home / "spec.yaml").write_text(RunSpec.model_validate({"method": {"kind": "full"}}).to_yaml())
    cmd = [sys.executable, "-m", "gptoss_cloud", "merge", home.name, "--store", str(store), "--verify"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "merged step 2 (full)" in r.stdout and "verified" in r.stdout
    assert (home / "merged" / "config.json").is_file()
    r = subprocess.run([sys.executable, "-m", "gptoss_cloud", "merge", "no-such-run", "--store", str(store)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "no-such-run" in r.stderr and "Traceback" not in r.stderr
