"""TrussBackend through the backend registry: dry-run writes a project truss_train loads; guards say one clear line."""

from __future__ import annotations

import json

import pytest

from gptoss_cloud.backends.base import SubmitOptions, get_backend
from gptoss_cloud.backends.truss import load_project
from gptoss_cloud.contract.errors import BackendError
from gptoss_cloud.contract.runs import new_run_id, run_home
from gptoss_cloud.contract.spec import load_spec


def submit(tmp_path, opts: SubmitOptions, **overrides):
    spec = load_spec(None, overrides={"model.name": "120b", "parallelism.nodes": 2, "cluster.backend": "truss", **overrides})
    run_id = new_run_id(spec.name)
    home = run_home(spec.output.store, run_id)
    return spec, get_backend("truss").submit(spec, run_id, home, opts)


def test_dry_run_writes_a_project_truss_loads_as_2_x_h100_8(tmp_path):
    out = tmp_path / "project"
    spec, res = submit(tmp_path, SubmitOptions(dry_run=True, out=out), **{"output.store": str(tmp_path / "runs")})
    assert res.backend == "truss"
    assert sorted(p.name for p in res.written) == ["config.py", "run.sh", "spec.yaml"]
    tp = load_project(out / "config.py")
    assert tp.job.compute.node_count == 2
    assert (tp.job.compute.accelerator.accelerator.value, tp.job.compute.accelerator.count) == ("H100", 8)
    assert tp.job.name == res.run_id
    assert res.details["accelerator"] == "H100:8" and res.details["nodes"] == 2
    assert "s3://" in res.details["warning"]  # a local store cannot be reached from Baseten
    assert not (tmp_path / "runs").exists(), "a dry run writes nothing to the store"
    assert res.rendered.startswith("# Baseten training project")


def test_dry_run_without_out_prints_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, res = submit(tmp_path, SubmitOptions(dry_run=True, output_format="json"), **{"output.store": "s3://b/runs"})
    assert res.written == []
    assert list(tmp_path.iterdir()) == []
    data = json.loads(res.rendered)
    assert data["node_count"] == 2 and data["secrets"]["AWS_ACCESS_KEY_ID"] == "aws_access_key_id"


def test_push_without_api_key_is_one_clear_line(tmp_path, monkeypatch):
    for var in ("BASETEN_API_KEY", "BASETEN_TRUSS_AUTH_API_KEY", "BASETEN_TRUSS_AUTH_REMOTE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.trussrc
    import truss.remote.remote_factory as rf

    monkeypatch.setattr(rf, "USER_TRUSSRC_PATH", tmp_path / ".trussrc")
    with pytest.raises(BackendError) as e:
        submit(tmp_path, SubmitOptions(out=tmp_path / "p"), **{"output.store": "s3://b/runs"})
    assert e.value.message == "no Baseten API key: set BASETEN_API_KEY"
    assert "truss login" in e.value.hint
    assert not (tmp_path / "p").exists(), "nothing is written before the credentials check"


def test_push_refuses_a_local_store(tmp_path, monkeypatch):
    monkeypatch.setenv("BASETEN_API_KEY", "bt_fake")
    with pytest.raises(BackendError, match="needs an s3:// store"):
        submit(tmp_path, SubmitOptions(), **{"output.store": str(tmp_path / "runs")})


def test_run_control_without_a_job_record_says_why(tmp_path):
    home = tmp_path / "runs" / "r-20260101-000000-abcd"
    home.mkdir(parents=True)
    backend = get_backend("truss")
    for call in (lambda: backend.status("r-20260101-000000-abcd", str(home)),
                 lambda: list(backend.logs("r-20260101-000000-abcd", str(home))),
                 lambda: backend.cancel("r-20260101-000000-abcd", str(home))):
        with pytest.raises(BackendError, match="has no Baseten job record"):
            call()
