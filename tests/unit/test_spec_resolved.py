"""The pod trains the resolved spec it was given: no environment override, and none smuggled in."""

from __future__ import annotations

import pytest

from gptoss_cloud.contract.errors import SpecError
from gptoss_cloud.contract.envnames import setting_named_by
from gptoss_cloud.contract.spec import RunSpec, check_pod_environ, load_spec, pod_environ, read_resolved_spec


@pytest.mark.parametrize("var, setting", [
    ("GPTOSS_OPTIM__LR", "optim.lr"),  # what load_spec applies
    ("GPTOSS_STORE", "output.store"),
    ("GPTOSS_OPTIM_LR", "optim.lr"),  # the single-underscore spelling of the same field
    ("GPTOSS_DATA_MAX_SEQ_LEN", "data.max_seq_len"),
    ("GPTOSS_CLUSTER_TRUSS_PROJECT", "cluster.truss.project"),
    ("GPTOSS_KERNELS_MXFP4_DEQUANT", "kernels.mxfp4_dequant"),
    ("GPTOSS_STEP_SPLIT", "optim.step_split"),  # retired knobs say where they went
    ("GPTOSS_CPU_THREADS", "parallelism.cpu_threads"),
])
def test_variables_naming_a_setting(var, setting):
    assert setting_named_by(var, RunSpec) == setting


@pytest.mark.parametrize("var", ["GPTOSS_RUN_ID", "GPTOSS_NODES", "GPTOSS_GPUS_PER_NODE", "GPTOSS_RDZV_PORT",
                                 "GPTOSS_CHECKPOINT_KEY", "GPTOSS_WEIGHTS_CACHE", "GPTOSS_CACHE_DIR", "RANK",
                                 "MASTER_ADDR", "NCCL_DEBUG", "AWS_ACCESS_KEY_ID", "GPTOSS_NAME"])
def test_topology_rendezvous_layout_and_credentials_pass(var):
    assert setting_named_by(var, RunSpec) is None
    check_pod_environ({var: "x"})


def test_resolved_spec_ignores_environment_and_user_config(tmp_path, monkeypatch):
    user = tmp_path / "user.yaml"
    user.write_text("optim: {lr: 0.5}\n")
    monkeypatch.setenv("GPTOSS_CONFIG", str(user))
    monkeypatch.setenv("GPTOSS_OPTIM__LR", "0.25")
    monkeypatch.setenv("GPTOSS_STORE", "s3://elsewhere/runs")
    path = tmp_path / "spec.yaml"
    path.write_text(RunSpec.model_validate({"optim": {"lr": 1e-4}, "output": {"store": str(tmp_path)}}).to_yaml())
    s = read_resolved_spec(path)
    assert s.optim.lr == 1e-4 and s.output.store == str(tmp_path)
    assert load_spec(path).optim.lr == 0.25  # the laptop's precedence is unchanged


def test_resolved_spec_errors_name_the_file(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("optim: {lr: -1}\n")
    with pytest.raises(SpecError, match=r"(?s)spec\.yaml.*optim\.lr"):
        read_resolved_spec(path)
    with pytest.raises(SpecError, match="not found"):
        read_resolved_spec(tmp_path / "missing.yaml")


def test_pod_environment_naming_a_setting_is_refused():
    with pytest.raises(SpecError) as e:
        check_pod_environ({"RANK": "0", "GPTOSS_OPTIM__LR": "1e-3", "GPTOSS_MXFP4_DEQUANT": "torch"})
    msg = str(e.value)
    assert "GPTOSS_OPTIM__LR names optim.lr" in msg and "GPTOSS_MXFP4_DEQUANT names kernels.mxfp4_dequant" in msg
    assert "RANK" not in msg.split(":")[0]


def test_pod_environ_drops_only_settings():
    env = pod_environ({"PATH": "/bin", "GPTOSS_STORE": "s3://b/p", "GPTOSS_CHECKPOINT_KEY": "k", "WORLD_SIZE": "2"})
    assert env == {"PATH": "/bin", "GPTOSS_CHECKPOINT_KEY": "k", "WORLD_SIZE": "2"}


@pytest.mark.parametrize("where", ["env", "secret_env"])
def test_cluster_env_naming_a_setting_is_refused(tmp_path, where):
    value = "1e-3" if where == "env" else {"name": "s"}
    path = tmp_path / "spec.yaml"
    path.write_text(RunSpec().to_yaml())
    with pytest.raises(SpecError) as e:
        load_spec(path, overrides={f"cluster.{where}": {"GPTOSS_OPTIM_LR": value}}, environ={})
    assert f"cluster.{where}.GPTOSS_OPTIM_LR: names the spec setting optim.lr" in str(e.value)
    assert "<root>" not in str(e.value)


def test_trainer_entry_refuses_a_setting_in_its_environment(tmp_path, monkeypatch, capsys):
    from gptoss_cloud.trainer.__main__ import main

    path = tmp_path / "spec.yaml"
    path.write_text(RunSpec.model_validate({"output": {"store": str(tmp_path / "runs")}}).to_yaml())
    monkeypatch.setenv("GPTOSS_KERNELS__COMPILE", "false")
    assert main([str(path), "--run-id", "r-20260101-000000-abcd"]) == 1
    assert "GPTOSS_KERNELS__COMPILE names kernels.compile" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_node_layout_options_apply_to_this_node_only(tmp_path):
    import argparse

    from gptoss_cloud.trainer.__main__ import node_spec

    spec = RunSpec.model_validate({"checkpoint": {"resume": "never"}})
    args = argparse.Namespace(local_dir="/scratch/r", weights_cache="/cache/models", retried=True)
    got = node_spec(spec, args)
    assert (got.checkpoint.local_dir, got.checkpoint.resume, got.model.cache_dir) == ("/scratch/r", "auto", "/cache/models")
    assert spec.checkpoint.resume == "never"
    assert node_spec(spec, argparse.Namespace(local_dir=None, weights_cache=None, retried=False)) is spec


def test_former_knobs_are_spec_fields_with_defaults(tmp_path):
    s = RunSpec()
    assert (s.kernels.mxfp4_dequant, s.kernels.experts_compile, s.optim.step_split, s.parallelism.cpu_threads) == (
        "auto", True, False, "auto")
    path = tmp_path / "spec.yaml"
    path.write_text("parallelism: {cpu_threads: yes}\n")
    with pytest.raises(SpecError, match="cpu_threads must be auto or a whole number from 1 to 1024"):
        read_resolved_spec(path)
    path.write_text("kernels: {mxfp4_dequant: fast}\n")
    with pytest.raises(SpecError, match="kernels.mxfp4_dequant"):
        read_resolved_spec(path)


def test_kernel_settings_reach_every_experts_module():
    import torch

    from gptoss_cloud.contract.sections import KernelsSection
    from gptoss_cloud.contract.shapes import shape_for
    from gptoss_cloud.trainer import model as M
    from gptoss_cloud.trainer.kernels.experts import COMPILE_ATTR
    from gptoss_cloud.trainer.kernels.experts_mxfp4 import mxfp4_experts_modules

    config = M.build_config(shape_for("tiny"), "eager", "eager")
    for base in ("bf16", "mxfp4"):
        hf = M.create_model(config, torch.float32, "meta", base_format=base)
        n = M.configure_experts_(hf, KernelsSection(experts_compile=False, mxfp4_dequant="torch"))
        assert n == config.num_hidden_layers
        experts = [m for name, m in hf.named_modules() if name.endswith("mlp.experts")]
        assert len(experts) == n and all(getattr(m, COMPILE_ATTR) is False for m in experts)
        assert all(m.dequant == "torch" for _, m in mxfp4_experts_modules(hf))
