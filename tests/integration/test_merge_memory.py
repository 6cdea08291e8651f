"""The merge streams tensor by tensor: merging a checkpoint of ~230 MB raises the merging process's
peak host memory by far less than the checkpoint's size (loading it whole would add all of it)."""

from __future__ import annotations

import gc
from pathlib import Path
import json
import subprocess
import sys

import torch

from gptoss_cloud.contract.spec import RunSpec
from gptoss_cloud.trainer.checkpoint.checkpointer import Checkpointer

# The process's own peak resident set, read by the test itself (not ru_maxrss: a child inherits the
# peak of the pytest process it was forked from).
HWM = """
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
"""
# Imports everything the merge imports, then reports the peak.
BASELINE = HWM + """
import json
import gptoss_cloud.trainer.merge.export
print(json.dumps({"maxrss": hwm()}))
"""
MERGE = HWM + """
import json, sys
from gptoss_cloud.trainer.merge.export import merge
r = merge(sys.argv[1], sys.argv[2])
print(json.dumps({"maxrss": hwm(), "peak": r.peak_rss_bytes, "scope": r.peak_rss_scope,
                  "bytes_written": r.bytes_written, "model_bytes": r.total_bytes, "wall_s": r.wall_s}))
"""


def wide_model():
    """A GPT-OSS with a small vocabulary and wide expert tensors: ~57 M fp32 parameters (~230 MB), none
    larger than 25 MB."""
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=16,
                       num_experts_per_tok=2, layer_types=["full_attention"] * 6, pad_token_id=1023, eos_token_id=1022)
    with torch.device("meta"):
        model = GptOssForCausalLM(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.02, 0.02)  # cheap and deterministic enough: the merge only moves bytes
    return model.float()


def run(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def wide_checkpoint(tmp_path, spec: RunSpec) -> tuple[Path, int, int]:
    """A published step-1 checkpoint of ``wide_model`` under ``tmp_path/run`` (and the tokenizer cache the merge
    copies from): (run home, checkpoint bytes, bytes of its largest fp32 tensor)."""
    from gptoss_cloud.trainer.hf_tokenizer import write_tokenizer

    write_tokenizer(tmp_path / "tok")  # the merge copies the generated tokenizer from this on-disk cache
    home = tmp_path / "run"
    model = wide_model()
    biggest = max(p.numel() * 4 for p in model.parameters())
    ck = Checkpointer(spec.checkpoint, str(home), spec=spec, record_metrics=False)
    ck.save(1, {"model": model})
    ck.close()
    del model, ck
    gc.collect()
    ckpt = sum(p.stat().st_size for p in (home / "checkpoints" / "step-1").glob("*.distcp"))
    return home, ckpt, biggest


def test_merge_peak_memory_stays_far_below_the_checkpoint(tmp_path):
    home, ckpt, biggest = wide_checkpoint(tmp_path, RunSpec.model_validate({"checkpoint": {"every_steps": 1}}))
    assert ckpt > 200 * 2**20 and biggest < 26 * 2**20

    base = run(BASELINE)
    res = run(MERGE, str(home), str(tmp_path / "merged"))
    growth = res["maxrss"] - base["maxrss"]
    # Loading the checkpoint whole would grow the peak by >= its size; streaming costs a few tensors.
    assert growth < 0.5 * ckpt, f"peak RSS grew by {growth / 2**20:.0f} MiB merging a {ckpt / 2**20:.0f} MiB checkpoint"
    assert res["bytes_written"] >= res["model_bytes"] >= 0.99 * ckpt  # every tensor was written
    assert res["peak"] <= res["maxrss"] and res["wall_s"] > 0
    print(f"checkpoint {ckpt / 2**20:.0f} MiB, largest tensor {biggest / 2**20:.0f} MiB, peak RSS growth "
          f"{growth / 2**20:.0f} MiB, merge {res['wall_s']:.1f}s ({res['scope']} peak {res['peak'] / 2**20:.0f} MiB)")
