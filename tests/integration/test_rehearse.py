"""`gptoss-cloud rehearse` for real on CPU: the rendered JobSet's pods as 2 torchrun node groups of one
gloo process each, checkpoints to the S3 test server, node group 1 SIGKILLed after step 2's checkpoint
is published, every group restarted with the same run id, and the resumed losses compared with an
uninterrupted run of the same groups (its home in a local folder, as the GPU rehearsal keeps it). About a minute on 2 cores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss_cloud.contract.store.objects import open_store
from gptoss_cloud.trainer.checkpoint.manifest import list_published

pytestmark = pytest.mark.slow

ROWS = [("What colour is the sky on Mars?", "Butterscotch by day, blue at sunset."), ("Name a prime.", "Seven."),
        ("Capital of France?", "Paris."), ("Two plus two?", "Four.")]


def test_kill_a_node_group_and_resume_like_an_uninterrupted_run(s3_bucket, s3_env, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n" for q, a in ROWS))
    spec = tmp_path / "tiny.yaml"
    spec.write_text(
        "name: rehearse-tiny\nmodel: {name: tiny, init: random, dtype: float32}\nmethod: {kind: full}\n"
        f"data: {{datasets: [{{path: {data}}}], max_seq_len: 128, shuffle: false}}\n"
        "optim: {max_steps: 4, warmup_steps: 0, lr: 0.003, schedule: constant, log_every: 1}\n"
        "parallelism: {nodes: 1, gpus_per_node: 8, activation_checkpointing: false, reshard_after_forward: false}\n"
        "kernels: {loss_chunk_tokens: 64}\ncheckpoint: {every_steps: 2}\n"
        f"output: {{store: {s3_bucket}, merge: false}}\n"
    )
    out_dir = tmp_path / "out"
    report_path = tmp_path / "report.json"
    exe = Path(sys.executable).with_name("gptoss-cloud")
    run_id = "rehearse-tiny-1"
    r = subprocess.run([str(exe), "rehearse", str(spec), "--nodes", "2", "--gpus-per-node", "1", "--kill-node", "1",
                        "--kill-at-step", "2", "--reference", "--reference-store", str(tmp_path / "ref-runs"),
                        "--run-id", run_id, "--out-dir", str(out_dir),
                        "--out", str(report_path), "--grace", "5", "--timeout", "300"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=360)
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(out_dir.rglob("node-*.log")))
    assert r.returncode == 0, r.stdout + r.stderr + logs
    assert "PASS" in r.stdout and "resumed from step 2" in r.stdout

    rep = json.loads(report_path.read_text())
    assert rep["pass"] and (rep["nodes"], rep["gpus_per_node"], rep["device"]) == (2, 1, "cpu")
    first, second = rep["attempts"]
    assert first["state"] == "Killed" and first["killed_node"] == 1 and first["returncodes"][1] == -9
    assert first["published_at_kill"][0] >= 2 and first["kill_time"] and "teardown_s" in first
    assert second["state"] == "Succeeded" and second["returncodes"] == [0, 0]
    # Resumed from the last checkpoint published when the groups were restarted, not from scratch.
    assert rep["resumed_from"] == rep["published_at_restart"][0] == rep["expected_resume"] >= 2
    cmp = rep["loss_comparison"]
    assert [row["step"] for row in cmp["steps"]] == list(range(rep["resumed_from"] + 1, 5))
    assert cmp["ok"] and cmp["max_abs_diff"] <= 1e-4 * max(abs(row["reference"]) for row in cmp["steps"])

    subs = {s["what"]: s for s in rep["substitutions"]}
    assert subs["MASTER_ADDR"]["here"] == "127.0.0.1" and subs["MASTER_ADDR"]["rendered"].endswith(f".{run_id}")
    assert {"HOME", "HF_HUB_CACHE", "TMPDIR", "argument /etc/gptoss/spec.yaml"} <= set(subs)
    assert "CUDA_VISIBLE_DEVICES (node 0)" not in subs  # CPU: no GPUs handed out
    cmd = rep["group_commands"][1]
    assert "--node-rank=1" in cmd and "--nnodes=2" in cmd and "--nproc-per-node=1" in cmd and cmd[-1] == run_id

    # The rehearsed run ends with its final checkpoint published; the reference ran in its own store
    # (--reference-store: only its metrics are compared) and its checkpoints were removed once it ended.
    assert list_published(open_store(f"{s3_bucket}/{run_id}").child("checkpoints"))[0] == 4
    assert rep["reference"]["home"] == str(tmp_path / "ref-runs" / rep["reference"]["run_id"])
    assert not open_store(f"{s3_bucket}/{rep['reference']['run_id']}").list("")
    ref_home = open_store(rep["reference"]["home"])
    assert rep["reference"]["checkpoints_removed"] > 0 and ref_home.list("checkpoints") == []
    assert ref_home.exists("metrics.jsonl")
    assert (out_dir / "node-0.log").is_file() and (out_dir / "node-1.log").is_file()
    assert (out_dir / "node-0.log").read_text().count(f"===== {run_id} attempt ") == 2
    # metrics.jsonl in the store keeps the killed attempt's steps: the resumed attempt appends to them.
    from gptoss_cloud.contract.progress import read_metrics

    steps = [m["step"] for m in read_metrics(f"{s3_bucket}/{run_id}") if "loss" in m and "eval_loss" not in m]
    assert steps[0] == 1 and steps[-1] == 4 and set(range(1, 5)) <= set(steps)
