"""`submit` (flags over the spec, --dry-run, --resume) through the real typer app."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gptoss_cloud.backends.local import local_gpu_count
from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.main import app
from gptoss_cloud.contract.spec import RunSpec, load_spec

RUN_ID = r"[a-z0-9-]+-\d{8}-\d{6}-[0-9a-f]{4}"


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def split_dry_run(text: str) -> tuple[str, RunSpec]:
    first, rest = text.split("\n", 1)
    assert first.startswith("# launch: "), text
    return first[len("# launch: "):], RunSpec.model_validate(yaml.safe_load(rest))


@pytest.fixture
def nproc() -> int:
    return local_gpu_count() or 2


def test_dry_run_local_prints_resolved_spec_and_command_and_writes_nothing(tmp_path, monkeypatch, nproc):
    monkeypatch.chdir(tmp_path)
    r = invoke("submit", "--dry-run", "--backend", "local", "--model", "tiny", "--name", "demo",
               "--method", "full", "--dataset", "chats.jsonl", "--store", "out")
    assert r.exit_code == 0, r.output
    cmd, spec = split_dry_run(r.stdout)
    assert "-m torch.distributed.run --standalone --nnodes 1" in cmd
    assert f"--nproc-per-node {nproc}" in cmd
    m = re.search(rf"-m gptoss_cloud\.trainer (\S+)/({RUN_ID})/spec\.yaml --run-id ({RUN_ID})$", cmd)
    assert m, cmd
    store, rid, rid2 = m.groups()
    assert rid == rid2 and rid.startswith("demo-") and len(rid) <= 50
    assert store == str(tmp_path / "out")                  # local stores become absolute
    assert spec.model.name == "tiny" and spec.method.kind == "full" and spec.name == "demo"
    assert [d.path for d in spec.data.datasets] == ["chats.jsonl"]
    assert spec.cluster.backend == "local" and spec.parallelism.gpus_per_node == nproc
    assert spec.output.store == str(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []                  # nothing written


def test_flags_override_the_spec_file_and_keep_the_rest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("run.yaml").write_text(
        "name: fromfile\nmodel: {name: 20b}\nmethod: {kind: full}\noptim: {lr: 0.001, max_steps: 7}\n"
        "data: {datasets: [{path: a.jsonl}, {path: b.jsonl, weight: 2}]}\ncluster: {backend: truss}\n"
    )
    r = invoke("submit", "run.yaml", "--dry-run", "--model", "tiny", "--method", "lora", "--backend", "local")
    assert r.exit_code == 0, r.output
    _, spec = split_dry_run(r.stdout)
    assert (spec.model.name, spec.method.kind, spec.cluster.backend) == ("tiny", "lora", "local")
    assert (spec.name, spec.optim.lr, spec.optim.max_steps) == ("fromfile", 0.001, 7)
    assert [d.path for d in spec.data.datasets] == ["a.jsonl", "b.jsonl"]


def test_backend_precedence_flag_over_env_over_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("run.yaml").write_text("cluster: {backend: k8s}\nmodel: {name: tiny}\n")
    monkeypatch.setenv("GPTOSS_BACKEND", "local")           # env beats the spec's k8s
    r = invoke("submit", "run.yaml", "--dry-run")
    assert r.exit_code == 0, r.output
    assert split_dry_run(r.stdout)[1].cluster.backend == "local"
    monkeypatch.setenv("GPTOSS_BACKEND", "k8s")
    r = invoke("submit", "run.yaml", "--dry-run", "--backend", "local")  # the flag beats env
    assert r.exit_code == 0, r.output
    assert split_dry_run(r.stdout)[1].cluster.backend == "local"


def test_dry_run_json_and_out_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke("submit", "--dry-run", "--backend", "local", "-o", "json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["command"][1:3] == ["-m", "torch.distributed.run"]
    assert RunSpec.model_validate(data["spec"]).cluster.backend == "local"
    r = invoke("submit", "--dry-run", "--backend", "local", "--out", "rendered")
    assert r.exit_code == 0, r.output
    assert [p.name for p in (tmp_path / "rendered").iterdir()] == ["launch.yaml"]
    assert r.stdout == ""
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nodes", "2"], "the local backend runs on this machine only, but parallelism.nodes is 2"),
        (["--method", "qlora"], "--method must be lora or full, not 'qlora'"),
        (["-o", "xml"], "-o/--output must be yaml or json"),
        (["--out", "x"], "--out is for --dry-run"),
        (["--name", "Bad_Name"], "name must be 1-30 lowercase letters"),
        (["--resume", "nope-20250101-000000-abcd"], "run 'nope-20250101-000000-abcd' not found"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    r = invoke("submit", "--backend", "local", *args)
    assert r.exit_code != 0
    assert isinstance(r.exception, GptossError), r.output
    assert message in str(r.exception)


def test_resume_keeps_id_and_home_and_resumes_automatically(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "runs"
    rid = "old-20250101-000000-abcd"
    spec = load_spec(overrides={"name": "old", "model.name": "tiny", "checkpoint.resume": "never",
                                "optim.max_steps": 5, "output.store": str(store)})
    (store / rid).mkdir(parents=True)
    (store / rid / "spec.yaml").write_text(spec.to_yaml())
    r = invoke("submit", "--resume", rid, "--store", str(store), "--dry-run")
    assert r.exit_code == 0, r.output
    cmd, resumed = split_dry_run(r.stdout)
    assert cmd.endswith(f"{store / rid / 'spec.yaml'} --run-id {rid}")
    assert resumed.checkpoint.resume == "auto" and resumed.optim.max_steps == 5
    # by full path too, with a flag changing the stored spec
    r = invoke("submit", "--resume", str(store / rid), "--dry-run", "--name", "old")
    assert r.exit_code == 0, r.output
    assert split_dry_run(r.stdout)[0].endswith(f"--run-id {rid}")


def test_console_script_reports_errors_as_one_line(tmp_path):
    exe = Path(sys.executable).with_name("gptoss-cloud")
    out = subprocess.run([str(exe), "status", "missing-run", "--store", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.startswith("error: run 'missing-run' not found: no spec.yaml under")
    assert "Traceback" not in out.stderr


def test_plan_refuses_what_cannot_fit_unless_forced(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke("submit", "--backend", "local", "--model", "120b", "--method", "full", "--dry-run")
    assert isinstance(r.exception, GptossError), r.output
    assert "run does not fit" in str(r.exception) and "--force" in str(r.exception)
    r = invoke("submit", "--backend", "local", "--model", "120b", "--method", "full", "--dry-run", "--force")
    assert r.exit_code == 0, r.output
    assert split_dry_run(r.stdout)[1].model.name == "120b"


def test_a_refused_submit_leaves_no_run_home(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # The Kubernetes backend refuses a local store (the pods cannot reach it): before spec.yaml is written.
    r = invoke("submit", "--backend", "k8s", "--model", "tiny", "--gpus-per-node", "1", "--store", "runs")
    assert isinstance(r.exception, GptossError), r.output
    assert "is a local folder the pods cannot reach" in str(r.exception)
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []


def test_train_needs_a_run_id_under_several_processes(tmp_path, monkeypatch):
    spec = tmp_path / "s.yaml"
    spec.write_text("model: {name: tiny}\n")
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = invoke("train", str(spec))
    assert isinstance(r.exception, GptossError) and "--run-id is required when WORLD_SIZE=2" in str(r.exception)
    r = invoke("train", str(spec), "--run-id", "Not_A_Run")
    assert isinstance(r.exception, GptossError) and "invalid run id 'Not_A_Run'" in str(r.exception)


@pytest.mark.parametrize("flag, expected", [([], 4), (["--gpus-per-node", "2"], 2), (["--gpus-per-node", "8"], 4)])
def test_local_gpus_default_to_all_and_a_bigger_spec_runs_on_what_there_is(tmp_path, monkeypatch, flag, expected):
    from gptoss_cloud.backends import local

    # the hardware query is the only thing replaced: this machine has no GPU
    monkeypatch.setattr(local, "local_gpu_count", lambda: 4)
    monkeypatch.setattr(local, "local_gpu", lambda: ("H100", 79.1))
    monkeypatch.chdir(tmp_path)
    r = invoke("submit", "--dry-run", "--backend", "local", "--model", "tiny", *flag)
    assert r.exit_code == 0, r.output
    cmd, spec = split_dry_run(r.stdout)
    assert f"--nproc-per-node {expected}" in cmd and spec.parallelism.gpus_per_node == expected
    assert (spec.cluster.gpu_type, spec.cluster.gpu_memory_gib) == ("H100", 79.1)
    assert ("this machine has 4 GPU(s); using 4" in r.stderr) == (flag == ["--gpus-per-node", "8"])
