"""The rendered start script, run under bash with Baseten's variables and a torchrun that records its call."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gptoss_cloud.backends.truss import load_project, write_project
from gptoss_cloud.render.truss.train import CONFIG_FILE, START_SCRIPT, render_truss_project
from gptoss_cloud.contract.spec import check_pod_environ, load_spec

RUN_ID = "ft120b-20260101-120000-beef"
BASH = shutil.which("bash")

# Stands in for torchrun: records argv and the environment the trainer would see, one JSON object.
FAKE_TORCHRUN = """#!/usr/bin/env python3
import json, os, sys
keys = [k for k in os.environ if k.startswith(("GPTOSS_", "HF_HOME"))]
with open(os.environ["RECORD"], "w") as f:
    json.dump({"argv": sys.argv[1:], "env": {k: os.environ[k] for k in keys}}, f)
"""


@pytest.fixture
def project(tmp_path):
    spec = load_spec(None, overrides={"model.name": "120b", "parallelism.nodes": 2, "output.store": "s3://b/runs"})
    folder = tmp_path / "project"
    write_project(render_truss_project(spec, RUN_ID), folder)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "torchrun").write_text(FAKE_TORCHRUN)
    (bindir / "torchrun").chmod(0o755)
    # The environment Baseten gives the container: what config.py declares (plain values only here).
    tp = load_project(folder / CONFIG_FILE)
    declared = {k: v for k, v in tp.job.runtime.environment_variables.items() if isinstance(v, str)}
    return folder, bindir, declared


def start(project, tmp_path, node: int, **bt) -> tuple[subprocess.CompletedProcess, dict | None]:
    folder, bindir, declared = project
    record = tmp_path / f"node{node}.json"
    env = {
        "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "RECORD": str(record),
        **declared,
        "BT_NODE_RANK": str(node),
        "BT_GROUP_SIZE": "2",
        "BT_NUM_GPUS": "8",
        "BT_LEADER_ADDR": "10.1.2.3",
        "BT_CHECKPOINT_DIR": "/mnt/ckpts",
        "BT_PROJECT_CACHE_DIR": "/root/.cache/user_artifacts",
        **bt,
    }
    # Baseten runs start_commands from the project folder; run from elsewhere to prove the script finds its spec.
    proc = subprocess.run([BASH, str(folder / START_SCRIPT)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    return proc, (json.loads(record.read_text()) if record.exists() else None)


def expected_argv(folder: Path, node: int, *node_opts: str) -> list[str]:
    return [
        "--nnodes", "2", "--nproc-per-node", "8", "--node-rank", str(node),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "10.1.2.3:29500", "--rdzv-id", RUN_ID,
        "--rdzv-conf", "join_timeout=1800",
        "-m", "gptoss_cloud.trainer", str(folder / "spec.yaml"), "--run-id", RUN_ID, *node_opts,
    ]


NODE_OPTS = ("--local-dir", f"/mnt/ckpts/{RUN_ID}", "--weights-cache", "/root/.cache/user_artifacts/models")


@pytest.mark.parametrize("node", [0, 1])
def test_each_node_launches_torchrun_with_its_rank(project, tmp_path, node):
    proc, rec = start(project, tmp_path, node)
    assert proc.returncode == 0, proc.stderr
    # Baseten's checkpoint folder is local scratch; the cache is where base weights land once. Both are
    # options of the trainer, never spec settings in its environment (which it would refuse).
    assert rec["argv"] == expected_argv(project[0], node, *NODE_OPTS)
    assert rec["env"]["HF_HOME"] == "/root/.cache/user_artifacts/huggingface"
    check_pod_environ(rec["env"])
    assert f"node {node} of 2" in proc.stdout


def test_a_retried_job_resumes(project, tmp_path):
    proc, rec = start(project, tmp_path, 1, BT_RETRY_COUNT="2")
    assert proc.returncode == 0, proc.stderr
    assert rec["argv"] == expected_argv(project[0], 1, *NODE_OPTS, "--retried")
    assert "attempt 2" in proc.stdout


def test_wrong_node_count_is_refused_before_launch(project, tmp_path):
    proc, rec = start(project, tmp_path, 0, BT_GROUP_SIZE="3")
    assert proc.returncode == 2
    assert rec is None
    assert "rendered for 2 nodes but Baseten started 3" in proc.stderr


def test_missing_run_id_is_refused(project, tmp_path):
    folder, bindir, declared = project
    declared = dict(declared)
    del declared["GPTOSS_RUN_ID"]
    proc, rec = start((folder, bindir, declared), tmp_path, 0)
    assert proc.returncode != 0 and rec is None
    assert "GPTOSS_RUN_ID is not set" in proc.stderr


def test_without_baseten_variables_it_is_one_local_node(project, tmp_path):
    folder, bindir, declared = project
    record = tmp_path / "solo.json"
    env = {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "RECORD": str(record),
           "GPTOSS_RUN_ID": RUN_ID, "GPTOSS_GPUS_PER_NODE": "2"}
    proc = subprocess.run([BASH, str(folder / START_SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(record.read_text())["argv"]
    assert argv[:6] == ["--nnodes", "1", "--nproc-per-node", "2", "--node-rank", "0"]
    assert "127.0.0.1:29500" in argv
