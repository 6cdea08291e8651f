"""`rehearse` without processes: the group env comes from the rendered JobSet, expanded as Kubernetes
expands it, with only the one-host substitutions; bad input is refused with one clear line."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gptoss_cloud.contract.errors import BackendError, SpecError
from gptoss_cloud.main import app
from gptoss_cloud.rehearse.run import RehearseOptions, compare_losses, first_step_logged, prepare_spec, read_losses, reference_spec, rehearse
from gptoss_cloud.rehearse.pods import base_environ, expand, plan_groups, render
from gptoss_cloud.render.k8s import jobset as K
from gptoss_cloud.contract.spec import RunSpec

RID = "rh-unit-20260101-000000-abcd"


def make_spec(**over) -> RunSpec:
    data = {"name": "rh-unit", "model": {"name": "tiny", "init": "random"}, "method": {"kind": "full"},
            "optim": {"max_steps": 6}, "checkpoint": {"every_steps": 2}, "output": {"store": "/tmp/rh-unit-store"}}
    for dotted, value in over.items():
        node = data
        *keys, last = dotted.split(".")
        for k in keys:
            node = node.setdefault(k, {})
        node[last] = value
    return RunSpec.model_validate(data)


def plan(spec: RunSpec, tmp_path: Path, *, gpus: int = 0, environ: dict | None = None, nodes: int = 2, per_node: int = 1,
         port: int | None = None):
    s = prepare_spec(spec, RehearseOptions(nodes=nodes, gpus_per_node=per_node))
    r = render(s, RID)
    plans, subs = plan_groups(r, tmp_path, gpus=gpus, environ=environ or {"PATH": "/usr/bin"}, port=port)
    return r, plans, {x.what: x for x in subs}


# ------------------------------------------------------------------------------------------ expansion
@pytest.mark.parametrize("text,want", [
    ("--node-rank=$(NODE_RANK)", "--node-rank=1"),
    ("$(A)-$(B)", "a-$(B)"),              # undefined: left as written
    ("$$(A)", "$(A)"),                    # $$ escapes
    ("cost $$5", "cost $5"),
    ("$(A", "$(A"),                       # unterminated
    ("$(A)$(A)", "aa"),
])
def test_expand_like_kubernetes(text, want):
    assert expand(text, {"A": "a", "NODE_RANK": "1"}) == want


# ---------------------------------------------------------------------------------------------- plans
def test_groups_take_command_and_env_from_the_rendered_container(tmp_path):
    r, plans, subs = plan(make_spec(), tmp_path)
    rendered_env = {e["name"]: e.get("value") for e in r.container["env"]}
    assert [p.env["NODE_RANK"] for p in plans] == ["0", "1"]
    for p in plans:
        # Kept exactly: topology, port and NCCL settings.
        for name in ("NNODES", "NPROC", "MASTER_PORT", "NCCL_DEBUG", "NCCL_IB_DISABLE", "TORCH_NCCL_ASYNC_ERROR_HANDLING"):
            assert p.env[name] == rendered_env[name], name
        assert p.env["MASTER_ADDR"] == "127.0.0.1"
        assert "CUDA_VISIBLE_DEVICES" not in p.env  # CPU: nothing
        home = Path(p.env["HOME"])
        assert home == p.root / "tmp" and home.is_dir() and p.env["TMPDIR"] == str(home)
        assert p.env["HF_HUB_CACHE"] == str(p.root / "cache" / "hf")
    assert rendered_env["MASTER_ADDR"] == K.master_addr(RID)
    cmd = plans[1].command
    assert Path(cmd[0]).name == "torchrun" and Path(cmd[0]).is_file()
    assert cmd[1:7] == ["--nnodes=2", "--nproc-per-node=1", "--node-rank=1", "--master-addr=127.0.0.1",
                        f"--master-port={rendered_env['MASTER_PORT']}", "--no-python"]
    assert Path(cmd[7]).name == "gptoss-cloud" and cmd[8] == "train" and cmd[-2:] == ["--run-id", RID]
    spec_file = Path(cmd[9])
    assert spec_file == plans[1].root / "etc-gptoss" / "spec.yaml"
    assert spec_file.read_text() == r.configmap["data"]["spec.yaml"]  # the ConfigMap's bytes
    assert yaml.safe_load(spec_file.read_text())["parallelism"] == {**yaml.safe_load(spec_file.read_text())["parallelism"],
                                                                    "nodes": 2, "gpus_per_node": 1}
    assert {"MASTER_ADDR", "HOME", "HF_HUB_CACHE", "TMPDIR", "argument /etc/gptoss/spec.yaml"} <= set(subs)
    assert subs["MASTER_ADDR"].rendered == K.master_addr(RID)
    assert "MASTER_PORT" not in subs


def test_gpus_are_split_between_groups(tmp_path):
    _, plans, subs = plan(make_spec(), tmp_path, gpus=8, per_node=4)
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plans] == ["0,1,2,3", "4,5,6,7"]
    assert "OMP_NUM_THREADS" not in plans[0].env
    _, plans, _ = plan(make_spec(), tmp_path / "b", gpus=4, per_node=1, environ={"CUDA_VISIBLE_DEVICES": "2,3,5,7"})
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plans] == ["2", "3"]
    with pytest.raises(BackendError, match="need 8 GPUs; this host has 2"):
        plan(make_spec(), tmp_path / "c", gpus=2, per_node=4)


def test_busy_rendezvous_port_is_replaced_once_for_all_groups(tmp_path):
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        busy = s.getsockname()[1]
        _, plans, subs = plan(make_spec(**{"cluster.rendezvous_port": busy}), tmp_path)
    ports = {p.env["MASTER_PORT"] for p in plans}
    assert len(ports) == 1 and ports != {str(busy)}
    assert subs["MASTER_PORT"].rendered == str(busy) and "busy" in subs["MASTER_PORT"].why
    assert f"--master-port={ports.pop()}" in plans[0].command


def test_secrets_come_from_the_callers_environment(tmp_path):
    spec = make_spec(**{"cluster.store_secret": {"name": "s3-creds"}, "cluster.hf_token_secret": {"name": "hf"}})
    env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "HF_TOKEN": "t", "PATH": "/usr/bin"}
    _, plans, subs = plan(spec, tmp_path, environ=env)
    assert plans[0].env["HF_TOKEN"] == "t"
    assert subs["HF_TOKEN"].rendered == "Secret hf key token"
    assert subs["envFrom Secret s3-creds"].here == "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY"
    _, plans, subs = plan(spec, tmp_path / "b", environ={"PATH": "/usr/bin"})
    assert "HF_TOKEN" not in plans[0].env and subs["HF_TOKEN"].here.endswith("(unset)")


def test_callers_topology_and_spec_overrides_do_not_leak_into_groups():
    env = base_environ({"PATH": "/x", "RANK": "3", "MASTER_ADDR": "h", "TORCHELASTIC_RUN_ID": "r", "GPTOSS_OPTIM__LR": "1",
                        "CUDA_VISIBLE_DEVICES": "0", "AWS_ACCESS_KEY_ID": "k", "TIKTOKEN_ENCODINGS_BASE": "/t"})
    assert env == {"PATH": "/x", "AWS_ACCESS_KEY_ID": "k", "TIKTOKEN_ENCODINGS_BASE": "/t"}


def test_relative_local_store_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = prepare_spec(make_spec(**{"output.store": "./runs"}), RehearseOptions())
    assert s.output.store == str(tmp_path / "runs")


def test_reference_run_can_keep_its_home_elsewhere(tmp_path, monkeypatch):
    """--reference-store: the reference's checkpoints go to a local folder, the rehearsed run keeps its store."""
    monkeypatch.chdir(tmp_path)
    s = prepare_spec(make_spec(**{"output.store": "s3://bucket/runs"}), RehearseOptions())
    assert reference_spec(s, RehearseOptions()) is s
    ref = reference_spec(s, RehearseOptions(reference_store="./ref-runs"))
    assert ref.output.store == str(tmp_path / "ref-runs") and s.output.store == "s3://bucket/runs"
    assert ref.model_dump(exclude={"output"}) == s.model_dump(exclude={"output"})
    # A reference home already in use there is refused before anything starts, naming where.
    used = tmp_path / "ref-runs" / f"{RID}-ref"
    used.mkdir(parents=True)
    (used / "metrics.jsonl").write_text("{}\n")
    spec = make_spec(**{"output.store": str(tmp_path / "runs")})
    opts = RehearseOptions(reference=True, run_id=RID, reference_store=str(tmp_path / "ref-runs"), out_dir=tmp_path / "out")
    with pytest.raises(SpecError, match=f"{RID}-ref is already used: {used}"):
        rehearse(spec, opts, gpus=0)
    assert not (tmp_path / "out").exists()


def test_weights_fetching_init_containers_are_refused():
    with pytest.raises(BackendError, match="init containers \\(fetch-weights\\)"):
        render(make_spec(**{"model.name": "20b", "model.init": "pretrained"}), RID)


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("over,opts,match", [
    ({}, dict(nodes=1, kill_node=0, kill_at_step=2), "needs at least 2 node groups"),
    ({}, dict(kill_node=2, kill_at_step=2), "--kill-node 2 is out of range: node groups are 0..1"),
    ({}, dict(kill_node=-1, kill_at_step=2), "out of range"),
    ({}, dict(kill_node=1, kill_at_step=6), "not before the end: optim.max_steps is 6"),
    ({}, dict(kill_node=1, kill_at_step=8), "not before the end"),
    ({}, dict(kill_node=1, kill_at_step=3), "not a checkpoint step: checkpoint.every_steps is 2"),
    ({"checkpoint.every_steps": None}, dict(kill_node=1, kill_at_step=2), "checkpoint.every_steps is not set"),
    ({"checkpoint.resume": "never"}, dict(kill_node=1, kill_at_step=2), "restarted groups would not resume"),
    ({"optim.max_steps": None}, dict(kill_node=1, kill_at_step=2), "needs optim.max_steps"),
    ({}, dict(kill_node=1), "--kill-node and --kill-at-step go together"),
    ({}, dict(kill_at_step=2), "go together"),
])
def test_bad_input_is_refused(over, opts, match):
    with pytest.raises(SpecError, match=match):
        prepare_spec(make_spec(**over), RehearseOptions(**opts))


def test_cli_refuses_before_starting_anything(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(make_spec(**{"checkpoint.every_steps": None}).model_dump(mode="json")))
    r = CliRunner().invoke(app, ["rehearse", str(spec), "--kill-node", "1", "--kill-at-step", "2",
                                 "--out-dir", str(tmp_path / "out")])
    assert isinstance(r.exception, SpecError) and "checkpoint.every_steps is not set" in r.exception.message
    assert not (tmp_path / "out").exists()
    r = CliRunner().invoke(app, ["rehearse", str(spec), "--run-id", "Bad_Id"])
    assert "invalid run id 'Bad_Id'" in str(r.exception)


# ------------------------------------------------------------------------------------------- losses
def test_losses_keep_the_resumed_attempts_values(tmp_path):
    rows = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, {"step": 3, "loss": 9.9},  # killed attempt
            {"step": 3, "loss": 3.0}, {"step": 4, "loss": 2.0}, {"step": 4, "loss": 2.0, "eval_loss": 2.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_losses(str(tmp_path)) == {1: 5.0, 2: 4.0, 3: 3.0, 4: 2.0}
    assert read_losses(str(tmp_path / "missing")) == {}


def test_compare_losses():
    ref = {1: 5.0, 2: 4.0, 3: 3.0, 4: 2.0}
    same = compare_losses(ref, {3: 3.0, 4: 2.0}, after=2, tolerance=1e-4)
    assert same["ok"] and same["max_abs_diff"] == 0 and [r["step"] for r in same["steps"]] == [3, 4]
    off = compare_losses(ref, {3: 3.0, 4: 2.001}, after=2, tolerance=1e-4)
    assert not off["ok"] and off["max_abs_diff"] == pytest.approx(1e-3) and off["max_rel_diff"] == pytest.approx(5e-4)
    assert compare_losses(ref, {1: 5.0}, after=2, tolerance=1e-4)["ok"] is False  # nothing after the resume


def test_first_step_logged():
    assert first_step_logged("loading\nstep 3/6  loss 1.0  10 tok/s  eta 1s\nstep 4/6 ...") == 3
    assert first_step_logged("no progress here") is None


def test_a_group_is_killed_with_every_process_it_started():
    """torchrun starts its workers in their own sessions: the kill follows the tree, not the process group."""
    import signal
    import subprocess
    import time

    from gptoss_cloud.rehearse.procs import _tree_alive, kill_tree, process_tree

    proc = subprocess.Popen(["sh", "-c", "setsid sleep 60 & sleep 60; wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(tree := process_tree(proc.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(tree) == 3  # sh, and both sleeps (one in its own session)
        kill_tree(tree, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while _tree_alive(tree) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _tree_alive(tree)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("per_node", [1, 4])
def test_the_gpu_rehearsal_spec_is_accepted_as_the_script_runs_it(tmp_path, per_node):
    """The `rehearse` suite (cli/suites/suites.toml): 2 groups x GPUS_PER_NODE, node 1 killed after step 3's checkpoint."""
    from gptoss_cloud.contract.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[2] / "examples" / "gpu-rehearse-20b-L1-full.yaml", environ={})
    s = prepare_spec(spec, RehearseOptions(nodes=2, gpus_per_node=per_node, kill_node=1, kill_at_step=3, reference=True,
                                                   reference_store=str(tmp_path / "ref")))
    plans, _ = plan_groups(render(s, RID), tmp_path, gpus=8, environ={})
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plans] == [",".join(str(g + i * per_node) for g in range(per_node))
                                                             for i in range(2)]
    assert (s.model.name, s.model.layers, s.method.kind, s.checkpoint.every_steps) == ("20b", 1, "full", 3)


def test_a_used_run_id_is_refused(tmp_path):
    (tmp_path / RID / "checkpoints" / "step-2").mkdir(parents=True)
    (tmp_path / RID / "checkpoints" / "step-2" / "manifest.json").write_text("{}")
    from gptoss_cloud.rehearse.run import rehearse

    with pytest.raises(SpecError, match=f"run id {RID} is already used"):
        rehearse(make_spec(**{"output.store": str(tmp_path)}), RehearseOptions(run_id=RID, out_dir=tmp_path / "out"), gpus=0)
    assert not (tmp_path / "out").exists()
