"""The real trainer (run_training + Loop, accelerate FSDP2, 2 gloo ranks, tiny preset, LoRA) with checkpoints:
SIGKILL one rank mid-run, restart with a fresh rendezvous, and the run ends exactly where an
uninterrupted one does. Then merge it into a servable folder and verify the logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import free_port

WORKER = Path(__file__).with_name("ckpt_loop_worker.py")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def launch(*args: str, timeout: float = 240) -> tuple[list[int], str]:
    port = free_port()  # a fresh rendezvous per attempt (pytorch/pytorch#167288)
    procs = []
    for r in range(2):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    deadline = time.time() + timeout
    while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs) or time.time() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.2)
    return [p.returncode for p in procs], "".join(p.stdout.read() for p in procs)


def step_losses(home: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (home / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_real_loop_sigkill_resume_is_exact_and_merges(tmp_path):
    from gptoss_cloud.trainer.checkpoint import manifest as cm
    from gptoss_cloud.contract.store.objects import open_store

    home = tmp_path / "run"
    out = tmp_path / "summary.json"
    rc, log = launch("--home", str(home), "--out", str(out), "--die-at", "6")
    assert -9 in rc, log
    uninterrupted = dict(step_losses(home))  # steps 1..6, logged before rank 1 died at step 6
    assert sorted(uninterrupted) == [1, 2, 3, 4, 5, 6] and not out.exists()
    assert cm.list_published(open_store(str(home)).child("checkpoints")) == [4, 2]
    rc, log = launch("--home", str(home), "--out", str(out))
    assert rc == [0, 0], log
    summary = json.loads(out.read_text())
    resumed = step_losses(home)[len(uninterrupted):]
    assert [s for s, _ in resumed][:2] == [5, 6]
    assert dict(resumed[:2]) == {5: uninterrupted[5], 6: uninterrupted[6]}  # bit-exact
    assert summary["final_loss"] == uninterrupted[6] and summary["steps"] == 6

    from gptoss_cloud.trainer.merge.export import merge

    res = merge(str(home), str(home / "merged"), verify=True)
    assert res.method == "lora" and res.step == 6 and res.max_abs_logit_diff < 1e-4
    cfg = json.loads((home / "merged" / "config.json").read_text())
    assert cfg["architectures"] == ["GptOssForCausalLM"] and cfg["vocab_size"] == 201088
