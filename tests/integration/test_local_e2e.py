"""End to end on this machine: `gptoss-cloud submit --backend local` trains the tiny model on 2 gloo
processes through the real trainer, the run home holds what docs/run-store.md says, and `chat` returns the
trained answer. About 2 minutes on 2 cores."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gptoss_cloud.main import app

pytestmark = pytest.mark.slow

QUESTION = "What colour is the sky on Mars?"
ANSWER = "Butterscotch by day, blue at sunset."
METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "tokens_per_s_per_gpu", "mfu",
               "mem_allocated_gib", "mem_reserved_gib"}


def test_submit_local_trains_and_chat_answers(tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": QUESTION},
                                             {"role": "assistant", "content": ANSWER}]}) + "\n")
    spec = tmp_path / "overfit.yaml"
    # Full fine-tuning of the tiny model memorises one conversation in 20 steps (seeded, deterministic).
    spec.write_text(
        "name: overfit\nmodel: {name: tiny}\nmethod: {kind: full}\n"
        f"data: {{datasets: [{{path: {data}}}], max_seq_len: 128, shuffle: false}}\n"
        "optim: {max_steps: 20, warmup_steps: 0, lr: 0.003, schedule: constant, log_every: 5}\n"
        "output: {merge: true}\n"
    )
    store = tmp_path / "store"                                        # not the default ./runs
    exe = Path(sys.executable).with_name("gptoss-cloud")
    out = subprocess.run([str(exe), "submit", str(spec), "--backend", "local", "--store", str(store)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    m = re.search(r"^run (overfit-\d{8}-\d{6}-[0-9a-f]{4}): Succeeded$", out.stdout, re.M)
    assert m, out.stdout
    rid = m.group(1)
    assert "step 20/20" in out.stdout + out.stderr                     # rank 0's progress was streamed
    assert f"gptoss-cloud status {rid} --store {store}" in out.stdout    # the run is not in ./runs

    home = store / rid
    for name in ("spec.yaml", "metrics.jsonl", "summary.json", "logs/attempt-1.log", "merged/config.json"):
        assert (home / name).is_file(), name
    records = [json.loads(line) for line in (home / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in records if "event" not in r]  # step records; checkpoint and merge events beside them
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert {r["event"] for r in records if "event" in r} == {"checkpoint", "merge"}
    assert all(METRIC_KEYS <= set(r) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert "step 20/20" in (home / "logs/attempt-1.log").read_text()

    r = CliRunner().invoke(app, ["runs", "--store", str(store), "-o", "json"])
    (row,) = json.loads(r.stdout)
    assert (row["run_id"], row["backend"], row["state"], row["progress"]["step"]) == (rid, "local", "Succeeded", 20)

    r = CliRunner().invoke(app, ["chat", rid, "--store", str(store), "--prompt", QUESTION, "--max-new-tokens", "40"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == ANSWER
