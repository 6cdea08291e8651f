"""adamw_8bit on 2 gloo FSDP2 processes (full fine-tuning, tiny preset): SIGKILL mid-run, resume with a
fresh rendezvous, then the 2-rank checkpoint on 1 process.

torchao's moments are tensor subclasses inside FSDP2's DTensors; torch.distributed.checkpoint saves
and loads them through their tensor attributes, so no conversion is written here.

fp32 masters resume bit-exact: losses and every rank's 8-bit moments (codes and scales). bf16 masters
resume with the weights exact (the first resumed loss is identical) but the moments not bit-exact:
every moment differs after the next update and the loss after it by ~1e-7 relative (the RNG that
stochastic rounding draws from is restored exactly: checked). docs/optimizers.md records this.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import free_port
from test_checkpoint_loop import step_losses

pytest.importorskip("torchao")
WORKER = Path(__file__).with_name("optim_worker.py")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def run(n: int, home: Path, out: Path, masters: str, *extra: str, timeout: float = 300) -> tuple[list[int], str]:
    """n ranks with a fresh rendezvous (pytorch/pytorch#167288); if one dies, the others are stopped."""
    port = free_port()
    procs = []
    for r in range(n):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=str(WORKER.parent), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), "--home", str(home), "--out", str(out),
                                       "--masters", masters, *extra], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    deadline = time.time() + timeout
    while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs) or time.time() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.2)
    return [p.returncode for p in procs], "".join(p.stdout.read() for p in procs)


def result(out: Path, rank: int) -> dict:
    return json.loads(Path(f"{out}.rank-{rank}").read_text())


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def uninterrupted(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"optim-base-{request.param}")
    rc, log = run(2, d / "run", d / "out", request.param)
    assert rc == [0, 0], log
    return d, request.param


def test_adamw_8bit_resume(uninterrupted, tmp_path):
    base_dir, masters = uninterrupted
    home, out = tmp_path / "run", tmp_path / "out"
    rc, log = run(2, home, out, masters, "--die-at", "6")
    assert -9 in rc, log
    rc, log = run(2, home, out, masters)
    assert rc == [0, 0], log
    base = dict(step_losses(base_dir / "run"))
    resumed = dict(step_losses(home)[6:])  # attempt 1 logged steps 1..6, then attempt 2 resumed after step 4
    assert sorted(resumed) == [5, 6] and resumed[5] == base[5]
    states = [(result(base_dir / "out", r)["state"], result(out, r)["state"]) for r in (0, 1)]
    assert all(any(k.endswith("exp_avg") for k in got) for _, got in states)
    if masters == "fp32":
        assert resumed[6] == base[6] and all(got == want for want, got in states)
    else:
        assert resumed[6] == pytest.approx(base[6], rel=1e-6)


@pytest.mark.parametrize("uninterrupted", ["fp32"], indirect=True)
def test_two_rank_8bit_checkpoint_resumes_on_one_process(uninterrupted, tmp_path):
    base_dir, masters = uninterrupted
    home = tmp_path / "run"
    shutil.copytree(base_dir / "run", home)
    rc, log = run(1, home, tmp_path / "out", masters, "--steps", "8")
    assert rc == [0], log
    assert "resharding checkpoint" in log
    losses = dict(step_losses(home))
    assert sorted(losses)[-2:] == [7, 8] and all(math.isfinite(v) and v < 20 for v in losses.values())
    assert result(tmp_path / "out", 0)["summary"]["steps"] == 8
