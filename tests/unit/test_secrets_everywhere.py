"""No credential reaches a rendered artifact: every artifact is rendered with planted values and every
byte is searched for them; a credential in plain environment is refused for every backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gptoss_cloud.contract.errors import SpecError
from gptoss_cloud.main import app
from gptoss_cloud.render.k8s import gitops
from gptoss_cloud.render.k8s.jobset import render_run
from gptoss_cloud.render.truss.train import render_truss_project
from gptoss_cloud.contract.spec import RunSpec, load_spec

RUN = "leak-20250101-000000-abcd"
# Values shaped like the real thing, each unique, so a find means a leak (not a coincidence).
PLANTED = {
    "HF_TOKEN": "hf_PlantedHuggingFaceToken1234567890",
    "AWS_ACCESS_KEY_ID": "AKIAPLANTED000000001",
    "AWS_SECRET_ACCESS_KEY": "planted/aws+secret/key0000000000000000001",
    "AWS_SESSION_TOKEN": "planted-session-token-0000000000000001",
    "WANDB_API_KEY": "planted0wandb0api0key00000000000000000001",
    "GPTOSS_CHECKPOINT_KEY": "planted-checkpoint-signing-key-0000001",
    "OPENAI_API_KEY": "sk-proj-PlantedOpenAIKey000000000000001",
    "VLLM_API_KEY": "planted-vllm-api-key-0000000000000001",
}
SPEC = {
    "name": "leak",
    "model": {"name": "20b"},
    "output": {"store": "s3://bucket/runs"},
    "cluster": {
        "backend": "k8s", "namespace": "ml",
        "store_secret": {"name": "store-creds"},
        "hf_token_secret": {"name": "hf", "key": "token"},
        "checkpoint_key_secret": {"name": "ckpt-key"},
        "secret_env": {"WANDB_API_KEY": {"name": "wandb", "key": "api-key"}, "OPENAI_API_KEY": {"name": "openai"}},
        "env": {"NCCL_DEBUG": "WARN", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1"},
    },
}


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def every_byte(folder: Path) -> bytes:
    return b"\n".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def assert_clean(blob: bytes | str, what: str) -> None:
    data = blob.encode() if isinstance(blob, str) else blob
    for name, value in PLANTED.items():
        assert value.encode() not in data, f"{what} contains the value of {name}"


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """The credentials exist in this environment (as on a developer's machine) and the spec references them."""
    for k, v in PLANTED.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    store = tmp_path / "store"
    home = store / RUN
    home.mkdir(parents=True)
    (home / "spec.yaml").write_text(RunSpec.model_validate(SPEC).to_yaml())
    (home / "merged").mkdir()
    for marker in ("config.json", "gptoss-merged.json"):
        (home / "merged" / marker).write_text("{}")
    return spec, store


def test_every_rendered_artifact_holds_references_never_values(planted, tmp_path):
    spec, store = planted
    seen: list[str] = []

    r = invoke("submit", str(spec), "--backend", "k8s", "--dry-run", "-o", "yaml")   # JobSet + spec ConfigMap
    assert r.exit_code == 0, r.output
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert {"JobSet", "ConfigMap"} <= {d["kind"] for d in docs}
    assert_clean(r.output, "submit --backend k8s --dry-run")
    seen.append("jobset")
    jobset = next(d for d in docs if d["kind"] == "JobSet")
    pod = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["WANDB_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "wandb", "key": "api-key"}}
    assert env["OPENAI_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "openai", "key": "OPENAI_API_KEY"}}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}

    for out, extra in ((tmp_path / "gitops", []), (tmp_path / "gitops-cron", ["--schedule", "0 3 * * 1"])):
        r = invoke("render", str(spec), "--out", str(out), *extra)                 # GitOps files meant for Git
        assert r.exit_code == 0, r.output
        assert_clean(every_byte(out) + r.output.encode(), f"render --out {out.name}")
        seen.append(out.name)

    r = invoke("submit", str(spec), "--backend", "truss", "--dry-run", "--out", str(tmp_path / "truss"))
    assert r.exit_code == 0, r.output
    files = every_byte(tmp_path / "truss")
    assert b"config.py" in b"".join(p.name.encode() for p in (tmp_path / "truss").rglob("*"))
    assert_clean(files + r.output.encode(), "truss project")                         # Truss config + spec + run.sh
    seen.append("truss")

    r = invoke("serve", RUN, "--store", str(store), "--backend", "k8s", "--dry-run", "-o", "yaml")  # merge Job + Deployment
    assert r.exit_code == 0, r.output
    assert {"Deployment", "Service"} <= {d["kind"] for d in yaml.safe_load_all(r.stdout) if d}
    assert_clean(r.output, "serve --backend k8s")
    seen.append("serve")
    assert len(seen) == 5


BACKENDS = ["local", "k8s", "truss"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(PLANTED))
def test_a_credential_in_cluster_env_is_refused_for_every_backend_with_the_setting_to_use(tmp_path, monkeypatch, backend, name):
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"model": {"name": "tiny"}, "output": {"store": "s3://bucket/runs"},
                                    "cluster": {"backend": backend, "env": {name: PLANTED[name]}}}))
    r = invoke("submit", str(spec), "--dry-run")
    assert isinstance(r.exception, SpecError), r.output
    msg = str(r.exception)
    assert f"cluster.env.{name} " in msg and PLANTED[name] not in msg
    want = {"local": f"export {name}", "truss": "cluster.truss.secrets",
            "k8s": {"HF_TOKEN": "cluster.hf_token_secret", "GPTOSS_CHECKPOINT_KEY": "cluster.checkpoint_key_secret",
                    "AWS_ACCESS_KEY_ID": "cluster.store_secret", "AWS_SECRET_ACCESS_KEY": "cluster.store_secret",
                    "AWS_SESSION_TOKEN": "cluster.store_secret"}.get(name, "cluster.secret_env")}[backend]
    if backend == "truss" and name in ("HF_TOKEN", "GPTOSS_CHECKPOINT_KEY"):
        want = "cluster.hf_token_secret" if name == "HF_TOKEN" else "cluster.checkpoint_key_secret"
    assert want in msg
    assert list(tmp_path.iterdir()) == [spec]


@pytest.mark.parametrize("value", [PLANTED["HF_TOKEN"], PLANTED["AWS_ACCESS_KEY_ID"], PLANTED["OPENAI_API_KEY"],
                                   "ghp_" + "a" * 36, "-----BEGIN OPENSSH PRIVATE KEY-----", "xoxb-1234567890-abc"])
def test_a_token_shaped_value_is_refused_under_any_name(value):
    with pytest.raises(SpecError, match=r"cluster\.env\.NOTES holds a value shaped like") as e:
        load_spec(overrides={"cluster.env": {"NOTES": f"see {value}"}})
    assert value not in str(e.value)


@pytest.mark.parametrize("where", ["cluster.truss.secrets", "cluster.secret_env"])
def test_a_token_pasted_where_a_secret_name_belongs_is_refused(where):
    ref = PLANTED["HF_TOKEN"] if where == "cluster.truss.secrets" else {"name": PLANTED["HF_TOKEN"]}
    key = "cluster.truss" if where == "cluster.truss.secrets" else "cluster.secret_env"
    over = {key: {"secrets": {"HF_TOKEN": ref}}} if key == "cluster.truss" else {key: {"HF_TOKEN": ref}}
    with pytest.raises(SpecError, match=rf"{where.replace('.', '[.]')}\.HF_TOKEN holds a value shaped like") as e:
        load_spec(overrides=over)
    assert PLANTED["HF_TOKEN"] not in str(e.value)


def test_switches_and_ordinary_settings_stay_allowed():
    s = load_spec(overrides={"cluster.env": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
                                             "NCCL_DEBUG": "INFO", "AWS_ENDPOINT_URL": "http://minio:9000"}})
    assert s.cluster.env["NCCL_DEBUG"] == "INFO"


def test_a_stored_run_spec_with_a_credential_is_refused_when_served(planted, monkeypatch):
    _, store = planted
    monkeypatch.setenv("GPTOSS_CLUSTER__ENV", json.dumps({"HF_TOKEN": PLANTED["HF_TOKEN"]}))
    r = invoke("serve", RUN, "--store", str(store), "--backend", "k8s", "--dry-run")
    assert r.exit_code != 0 and "cluster.env.HF_TOKEN" in str(r.exception)
    assert PLANTED["HF_TOKEN"] not in r.output + str(r.exception)


def test_renderers_refuse_a_spec_that_skipped_validation():
    spec = RunSpec.model_validate(SPEC)
    # model_copy does not validate: the renderers' own check is what stands between this and the files.
    bad = spec.model_copy(update={"cluster": spec.cluster.model_copy(update={"env": {"HF_TOKEN": PLANTED["HF_TOKEN"]}})})
    for render in (lambda: render_run(bad, RUN), lambda: gitops.schedule_objects(bad, "0 3 * * 1"),
                   lambda: render_truss_project(bad, RUN)):
        with pytest.raises(SpecError, match=r"cluster\.env\.HF_TOKEN (looks like a credential|holds a value shaped like)") as e:
            render()
        assert PLANTED["HF_TOKEN"] not in str(e.value)
