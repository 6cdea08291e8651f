"""The MXFP4 export as a run writes it: `gptoss-cloud merge RUN [--format ...]` resolving output.merge_format,
signed merged-mxfp4/ folders verified like merged/, the end-of-training merge writing every resolved
format, and the export's peak host memory bounded by a layer, not the model."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from mxfp4_base import lora_run, read_folder, write_published_base  # noqa: E402

from gptoss_cloud.contract.integrity import KEY_ENV  # noqa: E402
from gptoss_cloud.contract.outputs import OutputError, open_output, publish_local_folder  # noqa: E402
from gptoss_cloud.contract.store.objects import open_store  # noqa: E402

KEY = "hmac-key-for-mxfp4-tests"
RUN_ID = "mx-20260101-000000-abcd"


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptoss_cloud", "merge", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_merge_cli_resolves_the_format_and_signs_merged_mxfp4(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)  # the run signs its checkpoints and folders; every reader holds the key
    store = tmp_path / "runs"
    home = store / RUN_ID
    published = write_published_base(tmp_path / "published")
    shutil.copytree(tmp_path / "published", home / "base")  # the run's base/, signed as the trainer publishes it
    publish_local_folder(open_store(str(home / "base")), home / "base", KEY.encode())
    lora_run(home, home / "base", spec={"cluster": {"checkpoint_key_secret": {"name": "ckpt-key"}}})
    (home / "spec.yaml").write_text((home / "checkpoints" / "step-1" / "spec.yaml").read_text())
    env = {KEY_ENV: KEY}

    # output.merge_format: auto, experts untrained over an MXFP4 base -> the MXFP4 folder only.
    r = _cli(RUN_ID, "--store", str(store), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "merged step 1 (lora) as mxfp4" in r.stdout and "adapter kept at" in r.stdout
    assert (home / "merged-mxfp4" / "config.json").is_file() and not (home / "merged").exists()
    m = open_output(open_store(str(home / "merged-mxfp4")), signed_spec=True, key=KEY.encode())
    assert m.signed and {"config.json", "model.safetensors.index.json"} <= set(m.files)
    got = read_folder(home / "merged-mxfp4")
    assert all(torch.equal(got[k], published[k]) for k in got if k.endswith(("_blocks", "_scales")))

    # A reader refuses a tampered shard, as for merged/.
    shard = next((home / "merged-mxfp4").glob("model-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    from gptoss_cloud.contract.store.fetch import local_output

    refused = None
    try:
        local_output(str(home / "merged-mxfp4"), tmp_path / "fetched", signed=True)
    except OutputError as e:
        refused = str(e)
    assert refused and shard.name in refused

    # --format both --out X: X (bf16) and X-mxfp4; a bad --format is named.
    out = tmp_path / "served"
    r = _cli(RUN_ID, "--store", str(store), "--format", "both", "--out", str(out), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "as bf16" in r.stdout and "as mxfp4" in r.stdout
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert json.loads((tmp_path / "served-mxfp4" / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    r = _cli(RUN_ID, "--store", str(store), "--format", "fp4", env=env)
    assert r.returncode == 1 and "--format 'fp4'" in r.stderr and "Traceback" not in r.stderr


def test_training_ends_with_the_mxfp4_merge_over_a_frozen_mxfp4_base(tmp_path):
    """model.base_format: mxfp4 (frozen experts) and LoRA on attention: auto resolves to mxfp4, the run's
    merge writes merged-mxfp4/ whose experts are the bytes of the run's own base/, and records it."""
    from gptoss_cloud.contract.spec import RunSpec
    from gptoss_cloud.trainer.train import run_training

    torch.set_num_threads(2)
    spec = RunSpec.model_validate({
        "model": {"name": "tiny", "init": "random", "base_format": "mxfp4"}, "data": {"max_seq_len": 32},
        "method": {"kind": "lora"}, "optim": {"max_steps": 1, "lr": 1e-3, "warmup_steps": 0, "log_every": 1},
        "checkpoint": {"every_steps": 1}, "output": {"merge": True, "merge_format": "auto"},
    })
    home = tmp_path / "run"
    ids = list(range(1000, 1032))
    ds = SimpleNamespace(train=[SimpleNamespace(input_ids=ids, labels=ids, position_ids=list(range(32)), seq_lens=[32])],
                         validation=[])
    summary = run_training(spec, "mx", str(home), datasets=ds, interactive=False)
    assert summary["merged_formats"] == {"mxfp4": str(home / "merged-mxfp4")} and summary["merge"]["format"] == "mxfp4"
    assert not (home / "merged").exists()
    events = [json.loads(line) for line in (home / "metrics.jsonl").read_text().splitlines() if '"merge"' in line]
    assert [e["format"] for e in events if e.get("event") == "merge"] == ["mxfp4"]
    base = {}
    from safetensors import safe_open

    for f in (home / "base").glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            base.update({k: h.get_tensor(k) for k in h.keys()})
    got = read_folder(home / "merged-mxfp4")
    packed = [k for k in got if k.endswith(("_blocks", "_scales"))]
    assert packed and all(torch.equal(got[k], base[k]) for k in packed)


def test_the_mxfp4_export_streams_like_the_bf16_merge(tmp_path):
    """Exporting a ~230 MB fp32 checkpoint to MXFP4 raises the merging process's peak about as much as the
    bf16 merge does, plus the quantiser's work on one tensor, and by far less than the checkpoint (loading
    it whole would add all of it)."""
    from test_merge_memory import BASELINE, HWM, run, wide_checkpoint

    from gptoss_cloud.contract.spec import RunSpec

    home, ckpt, largest = wide_checkpoint(tmp_path, RunSpec.model_validate({"method": {"kind": "full"}}))
    code = HWM + """
import json, sys
from gptoss_cloud.trainer.merge.export import merge
r = merge(sys.argv[1], sys.argv[2], fmt=sys.argv[3])
print(json.dumps({"maxrss": hwm(), "model_bytes": r.total_bytes, "wall_s": r.wall_s}))
"""
    base = run(BASELINE)["maxrss"]
    dense, mx = (run(code, str(home), str(tmp_path / fmt), fmt) for fmt in ("bf16", "mxfp4"))
    grew = {f: r["maxrss"] - base for f, r in (("bf16", dense), ("mxfp4", mx))}
    # The export holds what the bf16 merge holds, plus for one expert tensor its packed bytes (17/32 byte a
    # weight), its bf16-cast neighbours and the quantiser's temporaries for one slice: under 4 such tensors.
    assert grew["mxfp4"] < grew["bf16"] + 4 * largest, (grew, largest)
    assert grew["mxfp4"] < 0.75 * ckpt, f"peak RSS grew by {grew['mxfp4'] / 2**20:.0f} MiB exporting {ckpt / 2**20:.0f} MiB"
    assert mx["model_bytes"] < 0.3 * ckpt  # experts at 17/32 byte a weight, the rest bf16: written, not held
    print(f"checkpoint {ckpt / 2**20:.0f} MiB (largest tensor {largest / 2**20:.0f} MiB): peak RSS growth "
          f"bf16 {grew['bf16'] / 2**20:.0f} MiB, MXFP4 {grew['mxfp4'] / 2**20:.0f} MiB in {mx['wall_s']:.1f}s")
