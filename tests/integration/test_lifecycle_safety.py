"""`delete` and `cancel` act only on validated runs and their own processes; refused submits leave nothing.

Real processes throughout: a `sleep` stands in for whatever process inherits a stale pid, a detached
launcher under a real torchrun for a running run, and the session's S3 server for a remote store.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gptoss_cloud.backends import local
from gptoss_cloud.trainer.programs.proc_identity import identity, running
from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.main import app
from gptoss_cloud.contract.spec import load_spec
from gptoss_cloud.contract.store.objects import open_store

RID = "ctl-20250101-000000-abcd"


def invoke(*args: str, **kw):
    return CliRunner().invoke(app, list(args), **kw)


def make_home(store: Path, rid: str = RID) -> Path:
    home = store / rid
    home.mkdir(parents=True)
    (home / "spec.yaml").write_text(load_spec(overrides={"output.store": str(store), "name": "ctl"}).to_yaml())
    return home


def wait_for(cond, timeout=30.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("ref", ["./", ".", "../project", "{abs}", "{abs}/"])
def test_delete_refuses_a_folder_that_is_not_a_run_home(tmp_path, monkeypatch, ref):
    project = tmp_path / "project"
    project.mkdir()
    (project / "spec.yaml").write_text(load_spec().to_yaml())
    (project / "train.py").write_text("precious work\n")
    monkeypatch.chdir(project)
    r = invoke("delete", ref.format(abs=project), "--yes")
    assert isinstance(r.exception, GptossError), r.output
    assert "'project'" in str(r.exception) and "is not a run id" in str(r.exception)
    assert sorted(p.name for p in project.iterdir()) == ["spec.yaml", "train.py"]


def test_delete_and_cancel_refuse_ids_that_are_not_run_ids(tmp_path):
    store = tmp_path / "store"
    for bad in ("x" * 60, "Bad", "..", "a/../../etc"):
        for cmd in (["delete", bad, "--yes"], ["cancel", bad]):
            r = invoke(*cmd, "--store", str(store))
            assert isinstance(r.exception, GptossError), (cmd, r.output)
            assert "run id" in str(r.exception)


@pytest.fixture
def stranger():
    """A process that is not ours, in its own session (what a reused pid may belong to)."""
    p = subprocess.Popen(["sleep", "120"], start_new_session=True)
    yield p
    p.kill()
    p.wait()


@pytest.mark.parametrize("record", ["legacy", "other-start", "other-command"])
def test_cancel_never_signals_a_process_that_merely_has_the_recorded_pid(tmp_path, stranger, record):
    home = make_home(tmp_path / "store")
    rec = {"run_id": RID, "attempt": 1, "supervisor_pid": stranger.pid, "torchrun_pid": stranger.pid}
    ident = identity(stranger.pid)
    if record == "other-start":
        rec["supervisor"] = rec["torchrun"] = {**ident, "start_ticks": ident["start_ticks"] - 1}
    elif record == "other-command":
        rec["supervisor"] = rec["torchrun"] = {**ident, "cmdline": [sys.executable, "-m", "torch.distributed.run"]}
    (home / "local").mkdir()
    (home / "local" / "run.json").write_text(json.dumps(rec))
    r = invoke("cancel", RID, "--store", str(home.parent))
    assert isinstance(r.exception, GptossError) and "is not running (state Failed)" in str(r.exception), r.output
    time.sleep(0.3)
    assert stranger.poll() is None and running(stranger.pid)
    # delete sees the same: nothing of ours runs, so it signals nothing and removes the home
    r = invoke("delete", RID, "--store", str(home.parent), "--yes")
    assert r.exit_code == 0, r.output
    assert not home.exists() and stranger.poll() is None


PAYLOAD = """
import os, pathlib, time
pathlib.Path(os.environ["PAYLOAD_READY"] + "." + os.environ["RANK"]).write_text("up")
while True:
    time.sleep(0.1)
"""


@pytest.mark.slow
def test_delete_of_a_running_local_run_stops_it_before_removing_its_files(tmp_path, monkeypatch):
    home = make_home(tmp_path / "store")
    script = tmp_path / "payload.py"
    script.write_text(PAYLOAD)
    monkeypatch.setenv("PAYLOAD_READY", str(tmp_path / "ready"))
    sd = local.state_dir(RID, str(home))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           "--max-restarts", "0", "--log-dir", str(sd / "torchrun"), str(script)]
    pid = local._spawn_detached(RID, str(home), 1, cmd)
    tr = None
    try:
        assert wait_for(lambda: (tmp_path / "ready.0").exists() and (tmp_path / "ready.1").exists(), 60)
        tr = json.loads((sd / "run.json").read_text())["torchrun_pid"]
        workers = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(int(p.name)) == tr]
        assert len(workers) == 2
        r = invoke("delete", RID, "--store", str(home.parent), "--yes")
        assert r.exit_code == 0, r.output
        assert f"stopped {RID}" in r.stderr
        assert not home.exists()
        assert wait_for(lambda: not running(tr) and not any(running(w) for w in workers), 30)
        assert wait_for(lambda: not running(pid), 10)
    finally:
        for p in (tr, pid):
            if p and running(p):
                os.killpg(p, signal.SIGKILL)


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_a_refused_submit_leaves_no_run_home_in_an_s3_store(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    r = invoke("submit", "--backend", "k8s", "--model", "tiny", "--gpus-per-node", "1", "--store", s3_bucket)
    assert isinstance(r.exception, GptossError), r.output
    assert open_store(s3_bucket).list("") == []
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.yaml"))


@pytest.mark.parametrize("body", [b"a: &a [x, x]\nb: &b [" + b", ".join([b"*a"] * 10) + b"]\n" + b"".join(
    b"%c: &%c [" % (99 + i, 99 + i) + b", ".join([b"*%c" % (98 + i)] * 10) + b"]\n" for i in range(7)), b"name: caf\xe9\n"])
def test_a_run_whose_spec_cannot_be_read_is_deleted_only_from_the_store_on_request(tmp_path, body):
    home = tmp_path / "store" / RID
    home.mkdir(parents=True)
    (home / "spec.yaml").write_bytes(body)
    (home / "metrics.jsonl").write_text("{}\n")
    r = invoke("delete", RID, "--store", str(home.parent), "--yes")
    assert isinstance(r.exception, GptossError), r.output
    assert "cannot read the spec" in str(r.exception) and "--keep-cluster" in str(r.exception) and home.exists()
    r = invoke("delete", RID, "--store", str(home.parent), "--yes", "--keep-cluster")
    assert r.exit_code == 0, r.output
    assert not home.exists() and "2 file(s)" in r.output
