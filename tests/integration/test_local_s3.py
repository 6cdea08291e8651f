"""Local runs with an S3 store (a real S3-compatible server on 127.0.0.1): the launcher's state stays
on this machine, the attempt log is uploaded, and `runs`/`status`/`logs` read the bucket."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from gptoss_cloud.backends import local
from gptoss_cloud.main import app
from gptoss_cloud.contract.spec import load_spec
from gptoss_cloud.contract.store.objects import open_store

pytestmark = pytest.mark.slow

PAYLOAD = "import os; print(f\"rank {os.environ['RANK']} trained\", flush=True)\n"


@pytest.fixture
def store(s3_bucket, monkeypatch, tmp_path):
    """A store on the session's S3 server (tests/integration/conftest.py), one level below the bucket."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return s3_bucket.rsplit("/", 1)[0] + "/team/runs"


def put_run(store: str, rid: str, files: dict[str, str] | None = None) -> str:
    home = f"{store}/{rid}"
    st = open_store(home)
    st.write_bytes("spec.yaml", load_spec(overrides={"output.store": store}).to_yaml().encode())
    for name, text in (files or {}).items():
        st.write_bytes(name, text.encode())
    return home


def test_local_run_with_an_s3_store(store, tmp_path):
    rid = "s3run-20250101-000000-abcd"
    home = put_run(store, rid)
    put_run(store, "other-20250102-000000-beef", {"metrics.jsonl": '{"step": 4, "loss": 1.5}\n', "summary.json": "{}"})
    open_store(store).write_bytes("loose-file.txt", b"not a run")

    script = tmp_path / "payload.py"
    script.write_text(PAYLOAD)
    sd = local.state_dir(rid, home)
    assert sd == tmp_path / "cache" / "gptoss-cloud" / "local-runs" / rid
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           "--max-restarts", "0", "--log-dir", str(sd / "torchrun"), "--tee", "3", "--local-ranks-filter", "0", str(script)]
    assert local.run_attempt(rid, home, 1, cmd, echo=False) == 0
    uploaded = open_store(home).read_bytes("logs/attempt-1.log").decode()
    assert "rank 0 trained" in uploaded
    assert local.next_attempt(rid, home) == 2

    r = CliRunner().invoke(app, ["runs", "--store", store, "-o", "json"])
    assert r.exit_code == 0, r.output
    rows = {row["run_id"]: row for row in json.loads(r.stdout)}
    assert set(rows) == {rid, "other-20250102-000000-beef"}
    assert rows[rid]["state"] == "Succeeded" and rows[rid]["home"] == home
    # no launcher record on this machine: the store's summary.json says it finished
    assert rows["other-20250102-000000-beef"]["state"] == "Succeeded"
    assert rows["other-20250102-000000-beef"]["progress"] == {"step": 4, "loss": 1.5}

    (sd / "logs" / "attempt-1.log").unlink()          # another machine: only the store has the log
    r = CliRunner().invoke(app, ["logs", f"{home}"])
    assert r.exit_code == 0, r.output
    assert "rank 0 trained" in r.stdout

    r = CliRunner().invoke(app, ["submit", "--dry-run", "--resume", rid, "--store", store])
    assert r.exit_code == 0, r.output
    first = r.stdout.splitlines()[0]
    assert first.endswith(f"-m gptoss_cloud.trainer {sd / 'spec.yaml'} --run-id {rid}")
