"""A detached local run under a real torchrun: status while it runs, logs, cancel, failure reports.

The payload is a small script instead of the trainer so these checks of the launcher take seconds;
tests/integration/test_local_e2e.py runs the real trainer through the same code.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gptoss_cloud.backends import local
from gptoss_cloud.trainer.programs.proc_identity import running
from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.main import app
from gptoss_cloud.contract.spec import load_spec

pytestmark = pytest.mark.slow

PAYLOAD = """
import os, sys, time, pathlib
rank = int(os.environ["RANK"])
print(f"rank {rank} of {os.environ['WORLD_SIZE']} up", flush=True)
mode = os.environ["PAYLOAD_MODE"]
if mode == "fail" and rank == 1:
    sys.exit("rank 1: data row 7 is malformed")
if mode == "wait":
    pathlib.Path(os.environ["PAYLOAD_READY"] + f".{rank}").write_text("up")
    while True:
        time.sleep(0.1)
print(f"rank {rank} done", flush=True)
"""


def torchrun(script: Path, log_dir: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
            "--max-restarts", "0", "--log-dir", str(log_dir), "--tee", "3", "--local-ranks-filter", "0", str(script)]


@pytest.fixture
def run(tmp_path, monkeypatch):
    store = tmp_path / "store"
    rid = "ctl-20250101-000000-abcd"
    home = store / rid
    home.mkdir(parents=True)
    (home / "spec.yaml").write_text(load_spec(overrides={"output.store": str(store), "name": "ctl"}).to_yaml())
    script = tmp_path / "payload.py"
    script.write_text(PAYLOAD)
    monkeypatch.setenv("PAYLOAD_READY", str(tmp_path / "ready"))
    return rid, str(home), script


def wait_for(cond, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return False


def test_detached_run_reports_running_then_cancels(run, tmp_path, monkeypatch):
    rid, home, script = run
    monkeypatch.setenv("PAYLOAD_MODE", "wait")
    sd = local.state_dir(rid, home)
    pid = local._spawn_detached(rid, home, 1, torchrun(script, sd / "torchrun" / "attempt-1"))
    try:
        assert wait_for(lambda: (tmp_path / "ready.0").exists() and (tmp_path / "ready.1").exists())
        r = CliRunner().invoke(app, ["status", rid, "--store", str(Path(home).parent), "-o", "json"])
        assert r.exit_code == 0, r.output
        st = json.loads(r.stdout)
        assert st["state"] == "Running" and st["detail"]["supervisor_pid"] == pid and st["detail"]["attempt"] == 1
        # rank 0's line reaches the log through torchrun's tee and the supervisor: give it a moment
        assert wait_for(lambda: "rank 0 of 2 up" in CliRunner().invoke(app, ["logs", home]).stdout, 20)
        r = CliRunner().invoke(app, ["logs", home])
        assert "rank 0 of 2 up" in r.stdout and "rank 1" not in r.stdout
        workers = _worker_pids(sd)
        assert len(workers) == 2
        r = CliRunner().invoke(app, ["cancel", rid, "--store", str(Path(home).parent)])
        assert r.exit_code == 0, r.output
        rec = json.loads((sd / "run.json").read_text())
        assert rec["state"] == "Cancelled" and rec["returncode"] != 0
        assert not running(pid) or wait_for(lambda: not running(pid), 10)
        # the workers (own sessions under torchrun) are gone too
        assert wait_for(lambda: not any(running(p) for p in workers), 30)
    finally:
        _stop(sd, pid)


def _stop(sd: Path, supervisor: int) -> None:
    """Leave nothing running whatever failed: torchrun has its own session, so stop it first."""
    tr = json.loads((sd / "run.json").read_text()).get("torchrun_pid") if (sd / "run.json").exists() else None
    for group in (tr, supervisor):
        if group and running(group):
            os.killpg(group, 15)
    wait_for(lambda: not running(tr) and not running(supervisor), 30)


def _worker_pids(sd: Path) -> list[int]:
    rec = json.loads((sd / "run.json").read_text())
    tr = rec.get("torchrun_pid")
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int(p.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1]) == tr:
                    out.append(int(p.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def test_a_launcher_killed_hard_leaves_a_run_that_cancel_still_stops(run, tmp_path, monkeypatch):
    rid, home, script = run
    monkeypatch.setenv("PAYLOAD_MODE", "wait")
    sd = local.state_dir(rid, home)
    pid = local._spawn_detached(rid, home, 1, torchrun(script, sd / "torchrun" / "attempt-1"))
    try:
        assert wait_for(lambda: (tmp_path / "ready.0").exists() and (tmp_path / "ready.1").exists())
        workers = _worker_pids(sd)
        os.killpg(pid, 9)                                   # the launcher dies without a word
        assert wait_for(lambda: not running(pid), 10)
        st = local.LocalBackend().status(rid, home)
        assert st.state == "Running" and "torchrun still runs" in st.detail["reason"]
        local.LocalBackend().cancel(rid, home)
        assert local.LocalBackend().status(rid, home).state == "Cancelled"
        assert wait_for(lambda: not any(running(p) for p in workers), 30)
    finally:
        _stop(sd, pid)


def test_foreground_attempt_streams_rank0_and_names_the_failing_rank(run, monkeypatch, capfd):
    rid, home, script = run
    monkeypatch.setenv("PAYLOAD_MODE", "fail")
    sd = local.state_dir(rid, home)
    rc = local.run_attempt(rid, home, 1, torchrun(script, sd / "torchrun" / "attempt-1"), echo=True)
    out, err = capfd.readouterr()
    assert rc != 0
    assert "rank 0 of 2 up" in out and "[default0]" not in out     # rank 0, unprefixed
    assert "--- rank 1" in err and "data row 7 is malformed" in err  # the root cause rank's stderr
    assert json.loads((sd / "run.json").read_text())["state"] == "Failed"
    log = (Path(home) / "logs" / "attempt-1.log").read_text()
    assert "rank 0 of 2 up" in log.splitlines() and "[default0]" not in log and "ChildFailedError" in log
    assert local.next_attempt(rid, home) == 2
    r = CliRunner().invoke(app, ["status", home, "-o", "json"])
    assert json.loads(r.stdout)["state"] == "Failed"
    with pytest.raises(GptossError, match="not running"):
        local.LocalBackend().cancel(rid, home)
