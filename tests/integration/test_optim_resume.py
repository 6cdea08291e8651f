"""adamw_8bit on 2 gloo FSDP2 processes (full fine-tuning, tiny preset): SIGKILL mid-run, resume with a
fresh rendezvous, and the losses and every rank's 8-bit moments (codes and scales) are bit-identical
to an uninterrupted run's; then the 2-rank checkpoint resumes on 1 process.

torchao's moments are tensor subclasses inside FSDP2's DTensors; torch.distributed.checkpoint saves
and loads them through their tensor attributes, so no conversion is written here.
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


def run(n: int, home: Path, out: Path, *extra: str, timeout: float = 300) -> tuple[list[int], str]:
    """n ranks with a fresh rendezvous (pytorch/pytorch#167288); if one dies, the others are stopped."""
    port = free_port()
    procs = []
    for r in range(n):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=str(WORKER.parent), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), "--home", str(home), "--out", str(out),
                                       "--masters", "bf16", *extra], env=env, stdout=subprocess.PIPE,
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


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("optim-base")
    rc, log = run(2, d / "run", d / "out")
    assert rc == [0, 0], log
    return d


def test_adamw_8bit_bf16_masters_resume_bit_exact(uninterrupted, tmp_path):
    home, out = tmp_path / "run", tmp_path / "out"
    rc, log = run(2, home, out, "--die-at", "6")
    assert -9 in rc, log
    rc, log = run(2, home, out)
    assert rc == [0, 0], log
    base = dict(step_losses(uninterrupted / "run"))
    resumed = step_losses(home)[6:]  # attempt 1 logged steps 1..6, then attempt 2 resumed after step 4
    assert dict(resumed) == {5: base[5], 6: base[6]}
    for r in (0, 1):
        want, got = result(uninterrupted / "out", r)["state"], result(out, r)["state"]
        assert got == want and any(k.endswith("exp_avg") for k in got)


def test_two_rank_8bit_checkpoint_resumes_on_one_process(uninterrupted, tmp_path):
    home = tmp_path / "run"
    shutil.copytree(uninterrupted / "run", home)
    rc, log = run(1, home, tmp_path / "out", "--steps", "8")
    assert rc == [0], log
    losses = dict(step_losses(home))
    assert sorted(losses)[-2:] == [7, 8] and all(math.isfinite(v) and v < 20 for v in losses.values())
    assert result(tmp_path / "out", 0)["summary"]["steps"] == 8
