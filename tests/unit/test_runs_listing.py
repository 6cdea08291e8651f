"""`runs`, `status` and `logs` over a local store populated the way runs leave it."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.main import app
from gptoss_cloud.contract.progress import list_run_ids, progress, read_metrics
from gptoss_cloud.contract.spec import load_spec


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def make_run(store, rid, *, backend="local", metrics=(), summary=None, record=None, log=None, max_steps=None):
    home = store / rid
    home.mkdir(parents=True)
    spec = load_spec(overrides={"cluster.backend": backend, "output.store": str(store), "optim.max_steps": max_steps})
    (home / "spec.yaml").write_text(spec.to_yaml())
    if metrics:
        (home / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if summary is not None:
        (home / "summary.json").write_text(json.dumps(summary))
    if record is not None:
        (home / "local").mkdir()
        (home / "local" / "run.json").write_text(json.dumps(record))
    if log is not None:
        (home / "logs").mkdir()
        (home / "logs" / "attempt-1.log").write_text(log)
    return home


@pytest.fixture
def store(tmp_path):
    s = tmp_path / "store"
    make_run(s, "done-20250101-000000-aaaa", max_steps=10,
             metrics=[{"step": 1, "loss": 12.1, "tokens_per_s": 900.0}, {"step": 10, "loss": 0.5, "tokens_per_s": 1000.0},
                      {"step": 10, "eval_loss": 0.7}],
             summary={"state": "succeeded"}, record={"attempt": 1, "state": "Succeeded", "returncode": 0},
             log="[rank0] step 1 loss 12.1\n[rank0] step 10 loss 0.5\n")
    make_run(s, "crashed-20250102-000000-bbbb", record={"attempt": 1, "supervisor_pid": 2**22 + 12345})
    (s / "not-a-run").mkdir()
    (s / "stray.txt").write_text("x")
    return s


def test_list_run_ids_only_counts_homes_with_a_spec(store):
    assert list_run_ids(str(store)) == ["crashed-20250102-000000-bbbb", "done-20250101-000000-aaaa"]
    assert list_run_ids(str(store / "absent")) == []


def test_runs_json_has_backend_state_and_progress(store):
    r = invoke("runs", "--store", str(store), "-o", "json")
    assert r.exit_code == 0, r.output
    rows = {row["run_id"]: row for row in json.loads(r.stdout)}
    done = rows["done-20250101-000000-aaaa"]
    assert (done["backend"], done["state"]) == ("local", "Succeeded")
    assert done["progress"] == {"step": 10, "loss": 0.5, "tokens_per_s": 1000.0, "eval_loss": 0.7, "max_steps": 10}
    crashed = rows["crashed-20250102-000000-bbbb"]
    assert crashed["state"] == "Failed" and crashed["progress"] == {}   # its launcher is gone, no result recorded


def test_runs_table_and_empty_store(store, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    r = invoke("runs", "--store", str(store))
    assert r.exit_code == 0, r.output
    assert "done-20250101-000000-aaaa" in r.stdout and "step 10/10, loss 0.5, eval 0.7" in r.stdout
    r = invoke("runs", "--store", str(tmp_path / "empty"))
    assert r.exit_code == 0 and "no runs in" in r.stdout


def test_status_by_id_and_by_path(store):
    r = invoke("status", "done-20250101-000000-aaaa", "--store", str(store))
    assert r.exit_code == 0, r.output
    assert "Succeeded" in r.stdout and "step 10/10, loss 0.5, eval 0.7, 1,000 tok/s" in r.stdout
    r = invoke("status", str(store / "crashed-20250102-000000-bbbb"), "-o", "json")
    assert r.exit_code == 0, r.output
    st = json.loads(r.stdout)
    assert st["state"] == "Failed" and "without recording a result" in st["detail"]["reason"]


def test_logs_of_a_finished_run(store):
    r = invoke("logs", "done-20250101-000000-aaaa", "--store", str(store))
    assert r.exit_code == 0, r.output
    assert r.stdout == "[rank0] step 1 loss 12.1\n[rank0] step 10 loss 0.5\n"
    r = invoke("logs", "done-20250101-000000-aaaa", "--store", str(store), "--node", "1")
    assert isinstance(r.exception, GptossError) and "one node (0), not node 1" in str(r.exception)


def test_cancel_of_a_finished_run_is_refused(store):
    r = invoke("cancel", "done-20250101-000000-aaaa", "--store", str(store))
    assert isinstance(r.exception, GptossError) and "is not running (state Succeeded)" in str(r.exception)


def test_metrics_reader_skips_a_half_written_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    rows = read_metrics(str(tmp_path))
    assert rows == [{"step": 1, "loss": 2.0}]
    assert progress(rows) == {"step": 1, "loss": 2.0}
    from gptoss_cloud.contract.progress import format_progress

    assert format_progress(progress([{"step": 3, "loss": 1.25, "epoch": 0.5}])) == "step 3 (epoch 0.50), loss 1.25"
