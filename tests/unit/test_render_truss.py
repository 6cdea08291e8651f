"""The rendered Truss project: config.py loads through truss_train's own loader and says what the spec says."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from gptoss_cloud.backends.truss import load_project, write_project
from gptoss_cloud.contract.errors import BackendError, SpecError
from gptoss_cloud.render.truss.train import CONFIG_FILE, SPEC_FILE, START_SCRIPT, render_truss_project
from gptoss_cloud.contract.spec import load_spec, spec_from_yaml_text

RUN_ID = "ft120b-20260101-120000-beef"


def spec_120b(**extra):
    overrides = {
        "model.name": "120b",
        "parallelism.nodes": 2,
        "output.store": "s3://my-bucket/runs",
        "cluster.hf_token_secret": {"name": "hf_access_token"},
        "cluster.checkpoint_key_secret": {"name": "gptoss_ckpt_key"},
        "cluster.env": {"NCCL_DEBUG": "WARN"},
    }
    overrides.update(extra)
    return load_spec(None, overrides=overrides)


def load(tmp_path: Path, spec) -> object:
    project = render_truss_project(spec, RUN_ID)
    write_project(project, tmp_path)
    return load_project(tmp_path / CONFIG_FILE)


def test_config_loads_as_one_training_project_with_the_specs_shape(tmp_path):
    from truss_train import definitions

    tp = load(tmp_path, spec_120b())
    assert isinstance(tp, definitions.TrainingProject)
    assert tp.name == "gptoss"
    job = tp.job
    assert job.name == RUN_ID
    assert job.compute.node_count == 2
    assert job.compute.accelerator.accelerator.value == "H100"
    assert job.compute.accelerator.count == 8
    assert job.image.base_image.startswith("ghcr.io/gptoss-cloud/trainer:")
    assert job.runtime.start_commands == [f"bash ./{START_SCRIPT}"]
    assert job.runtime.checkpointing_config.enabled is True
    assert job.runtime.cache_config.enabled is True

    env = job.runtime.environment_variables
    plain = {k: v for k, v in env.items() if isinstance(v, str)}
    refs = {k: v.name for k, v in env.items() if isinstance(v, definitions.SecretReference)}
    assert plain == {"GPTOSS_RUN_ID": RUN_ID, "GPTOSS_NODES": "2", "GPTOSS_GPUS_PER_NODE": "8",
                     "GPTOSS_RDZV_PORT": "29500", "NCCL_DEBUG": "WARN"}
    assert refs == {
        "AWS_ACCESS_KEY_ID": "aws_access_key_id",
        "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
        "HF_TOKEN": "hf_access_token",
        "GPTOSS_CHECKPOINT_KEY": "gptoss_ckpt_key",
    }
    # What Baseten receives: truss' own serialisation of the compute section.
    assert job.compute.model_dump()["accelerator"] == {"accelerator": "H100", "count": 8}


def test_spec_yaml_is_the_resolved_spec_marked_for_truss(tmp_path):
    spec = spec_120b()
    project = render_truss_project(spec, RUN_ID)
    back = spec_from_yaml_text(project.files[SPEC_FILE])
    assert back.cluster.backend == "truss"
    assert back.model.name == "120b" and back.parallelism.nodes == 2
    assert back.model_dump(exclude={"cluster"}) == spec.model_dump(exclude={"cluster"})
    assert spec.cluster.backend == "local", "rendering must not change the caller's spec"


def test_truss_section_settings_reach_the_job(tmp_path):
    spec = spec_120b(**{
        "parallelism.gpus_per_node": 4,
        "cluster.truss": {
            "project": "oss-ft", "accelerator": "h200", "base_image": "registry.example.com/trainer:1",
            "cache": False, "checkpoint_volume_gib": 2048,
            "secrets": {"HF_TOKEN": "my_hf", "AWS_SECRET_ACCESS_KEY": None, "WANDB_API_KEY": "wandb"},
        },
    })
    tp = load(tmp_path, spec)
    assert tp.name == "oss-ft"
    assert (tp.job.compute.accelerator.accelerator.value, tp.job.compute.accelerator.count) == ("H200", 4)
    assert tp.job.image.base_image == "registry.example.com/trainer:1"
    assert tp.job.runtime.cache_config.enabled is False
    assert tp.job.runtime.checkpointing_config.volume_size_gib == 2048
    refs = {k: v.name for k, v in tp.job.runtime.environment_variables.items() if not isinstance(v, str)}
    assert refs == {"AWS_ACCESS_KEY_ID": "aws_access_key_id", "HF_TOKEN": "my_hf",
                    "GPTOSS_CHECKPOINT_KEY": "gptoss_ckpt_key", "WANDB_API_KEY": "wandb"}


def test_local_store_needs_no_store_secrets():
    data = render_truss_project(load_spec(None), RUN_ID).data
    assert data["secrets"] == {}
    assert data["node_count"] == 1


def test_no_secret_value_in_any_rendered_file(tmp_path, monkeypatch):
    values = {
        "AWS_ACCESS_KEY_ID": "AKIAFAKEVALUE0000001",
        "AWS_SECRET_ACCESS_KEY": "fake/secret+access/key0000000000000000001",
        "HF_TOKEN": "hf_fakeTokenValue000000000000001",
        "BASETEN_API_KEY": "bt_fake_api_key_000001",
        "GPTOSS_CHECKPOINT_KEY": "fake-checkpoint-key-000001",
    }
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    project = render_truss_project(spec_120b(), RUN_ID)
    written = write_project(project, tmp_path)
    assert {p.name for p in written} == {CONFIG_FILE, SPEC_FILE, START_SCRIPT}
    for path in written:
        text = path.read_text()
        for v in values.values():
            assert v not in text, f"{path.name} contains a secret value"
    assert os.access(tmp_path / START_SCRIPT, os.X_OK)


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"cluster.env": {"HF_TOKEN": "x"}}, "cluster.env.HF_TOKEN"),
        ({"cluster.env": {"MY_PASSWORD": "x"}}, "looks like a credential"),
        ({"cluster.env": {"GPTOSS_RUN_ID": "x"}}, "set by gptoss-cloud itself"),
        ({"cluster.env": {"1BAD": "x"}}, "not a valid environment variable name"),
        ({"cluster.truss": {"secrets": {"BAD-NAME": "x"}}}, "cluster.truss.secrets.BAD-NAME"),
        ({"cluster.truss": {"secrets": {"HF_TOKEN": " "}}}, "secret name is empty"),
        ({"cluster.truss": {"accelerator": "H100:8"}}, "cluster.truss.accelerator"),
    ],
)
def test_bad_settings_name_the_field(extra, message):
    with pytest.raises(SpecError, match=message.replace(".", r"\.")):
        render_truss_project(spec_120b(**extra), RUN_ID)


def test_unknown_truss_key_is_refused():
    with pytest.raises(SpecError, match=r"cluster\.truss\.acclerator: unknown key"):
        load_spec(None, overrides={"cluster.truss": {"acclerator": "H100"}})


def test_accelerator_truss_does_not_know_fails_at_load(tmp_path):
    project = render_truss_project(spec_120b(**{"cluster.truss": {"accelerator": "H999"}}), RUN_ID)
    write_project(project, tmp_path)
    with pytest.raises(BackendError, match="does not load as a Truss training project.*H999"):
        load_project(tmp_path / CONFIG_FILE)


def test_rendering_is_deterministic():
    a = render_truss_project(spec_120b(), RUN_ID).files
    b = render_truss_project(spec_120b(), RUN_ID).files
    assert a == b
    assert yaml.safe_load(a[SPEC_FILE])["cluster"]["truss"]["cache"] is True


def test_values_are_written_as_python_literals_not_code(tmp_path):
    tricky = "it's \"quoted\"\n'); import os; os.system('echo pwned') #"
    tp = load(tmp_path, spec_120b(**{"cluster.env": {"NOTE": tricky}, "cluster.truss": {"project": "a'b\"c"}}))
    assert tp.job.runtime.environment_variables["NOTE"] == tricky
    assert tp.name == "a'b\"c"
