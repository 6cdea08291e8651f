"""`serve` on Kubernetes and Truss: rendered objects against the real schemas, from runs in a real store folder."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.main import app
from gptoss_cloud.render.k8s import serve as rs
from gptoss_cloud.backends.serving import resolve_target
from gptoss_cloud.backends.truss import serve_config as render_truss
from gptoss_cloud.contract.spec import RunSpec
from k8s_schemas import validate_object

RUN = "demo-20250101-000000-abcd"


# ------------------------------------------------------------------------------------- helpers
def validate_k8s(obj: dict) -> None:
    """Kubernetes 1.33 OpenAPI schema, strict (unknown fields are errors); JobSets against the CRD."""
    validate_object(obj)


RESTRICTED_VOLUME_KINDS = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}


def assert_restricted(pod: dict) -> None:
    """Pod Security Standards, "restricted" profile (the checks that apply to these pods)."""
    psc = pod.get("securityContext", {})
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    for v in pod.get("volumes", []):
        kinds = set(v) - {"name"}
        assert kinds <= RESTRICTED_VOLUME_KINDS, v
    for c in pod.get("initContainers", []) + pod["containers"]:
        sc = c.get("securityContext", {})
        assert sc.get("allowPrivilegeEscalation") is False, c["name"]
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], c["name"]
        assert not sc.get("capabilities", {}).get("add"), c["name"]
        assert not sc.get("privileged"), c["name"]
        assert (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")) is True, c["name"]
        assert sc.get("runAsUser", psc.get("runAsUser", 1)) != 0
        seccomp = sc.get("seccompProfile") or psc.get("seccompProfile")
        assert seccomp and seccomp["type"] in ("RuntimeDefault", "Localhost"), c["name"]
        for p in c.get("ports", []):
            assert "hostPort" not in p


def make_run(store: Path, run_id: str = RUN, *, merged: bool = False, adapter: bool = False, steps=(), **tree) -> Path:
    base = {"name": "demo", "model": {"name": "120b"}, "output": {"store": "s3://bucket/runs"},
            "cluster": {"backend": "k8s", "namespace": "ml", "store_secret": {"name": "store-creds"}}}
    for k, v in tree.items():
        base[k] = {**base.get(k, {}), **v}
    home = store / run_id
    home.mkdir(parents=True)
    (home / "spec.yaml").write_text(RunSpec.model_validate(base).to_yaml())
    if merged:
        (home / "merged").mkdir()
        (home / "merged" / "config.json").write_text("{}")
        (home / "merged" / rs.MERGED_MARKER).write_text("{}")
    if adapter:
        (home / "adapter").mkdir()
        (home / "adapter" / rs.ADAPTER_MARKER).write_text(json.dumps({"r": 16}))
    for s in steps:
        (home / "checkpoints" / f"step-{s}").mkdir(parents=True)
        (home / "checkpoints" / f"step-{s}" / "manifest.json").write_text("{}")
    return home


def target(store: Path, **overrides):
    t, notes = resolve_target(RUN, str(store), {k.replace("__", "."): v for k, v in overrides.items()}, environ={})
    return t


def by_kind(objs):
    return {o["kind"]: o for o in objs}


# --------------------------------------------------------------------------------------- tests
def test_120b_renders_merge_job_deployment_service_networkpolicy_all_valid(tmp_path):
    make_run(tmp_path, output={"merge_format": "bf16"})   # a bf16 merge: TP 4 on 80 GB cards
    t = target(tmp_path)
    objs = rs.serve_objects(t)
    assert [o["kind"] for o in objs] == ["Job", "Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget"]
    for o in objs:
        validate_k8s(o)
        assert len(o["metadata"]["name"]) <= 63
    k = by_kind(objs)
    assert_restricted(k["Job"]["spec"]["template"]["spec"])
    assert_restricted(k["Deployment"]["spec"]["template"]["spec"])
    assert k["Job"]["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "gptoss-cloud", "merge", str(tmp_path / RUN), "--out", f"{tmp_path / RUN}/merged", "--format", "bf16"]

    pod = k["Deployment"]["spec"]["template"]["spec"]
    vllm = pod["containers"][0]
    args = vllm["args"]
    assert vllm["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert args[:2] == ["--model", "/models/merged"]
    assert args[args.index("--tensor-parallel-size") + 1] == "4"   # bf16 120b on 80 GB cards
    assert args[args.index("--served-model-name") + 1] == RUN
    assert args[args.index("--max-model-len") + 1] == "32768"
    assert args[args.index("--gpu-memory-utilization") + 1] == "0.9"
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "4" == vllm["resources"]["requests"]["nvidia.com/gpu"]
    env = {e["name"]: e for e in vllm["env"]}
    assert env["TIKTOKEN_ENCODINGS_BASE"]["value"] == rs.VOCAB_DIR
    assert env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": f"vllm-{RUN}-api-key", "key": "api-key"}
    assert "--api-key" not in args  # the key stays out of the process list
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert vllm[probe]["httpGet"]["path"] == "/health"
    startup = vllm["startupProbe"]["periodSeconds"] * vllm["startupProbe"]["failureThreshold"]
    assert startup >= rs.startup_budget_s(t.shape, 4, "bf16") > 600

    init = pod["initContainers"][0]
    assert init["command"][:3] == ["python", "-m", "gptoss_cloud.trainer.programs.serve_fetch"]
    assert "--wait-for" in init["command"] and rs.MERGED_MARKER in init["command"]
    assert init["envFrom"] == [{"secretRef": {"name": "store-creds"}}]

    np = k["NetworkPolicy"]["spec"]
    assert np["podSelector"]["matchLabels"] == k["Service"]["spec"]["selector"] == k["Deployment"]["spec"]["selector"]["matchLabels"]
    assert np["ingress"][0]["from"][0]["namespaceSelector"]["matchExpressions"][0]["values"] == ["ml"]


def test_merge_job_skipped_when_merged_is_published(tmp_path):
    make_run(tmp_path, merged=True)
    assert [o["kind"] for o in rs.serve_objects(target(tmp_path))] == ["Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget"]


def test_20b_fits_one_gpu_and_flags_override_the_run_spec(tmp_path):
    make_run(tmp_path, model={"name": "20b"}, serve={"allowed_namespaces": ["apps", "ml"]})
    t = target(tmp_path)
    assert t.tp == 1
    t = target(tmp_path, serve__tp=2, serve__replicas=3, cluster__namespace="other")
    d = rs.deployment(t)
    validate_k8s(d)
    assert d["spec"]["replicas"] == 3 and d["metadata"]["namespace"] == "other"
    assert d["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert rs.network_policy(t)["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchExpressions"][0]["values"] == ["apps", "ml"]


def test_checkpoint_step_merges_that_step(tmp_path):
    make_run(tmp_path, steps=(100, 200))
    t = target(tmp_path, serve__checkpoint="100")
    job = rs.merge_job(t)
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][2:] == [
        f"{tmp_path / RUN}/checkpoints/step-100", "--out", f"{tmp_path / RUN}/merged-step-100-mxfp4", "--format", "mxfp4"]
    with pytest.raises(GptossError) as e:
        target(tmp_path, serve__checkpoint="150")
    assert "step-150" in str(e.value) and "step-100, step-200" in str(e.value)


def test_adapter_serves_hub_base_plus_lora(tmp_path):
    make_run(tmp_path, adapter=True, model={"name": "20b"}, method={"kind": "lora", "lora": {"r": 24}},
             cluster={"backend": "k8s", "namespace": "ml", "hf_token_secret": {"name": "hf", "key": "token"}})
    t = target(tmp_path, serve__adapter=True)
    objs = rs.serve_objects(t)
    assert [o["kind"] for o in objs] == ["Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget"]  # no merge for --adapter
    for o in objs:
        validate_k8s(o)
    c = objs[0]["spec"]["template"]["spec"]["containers"][0]
    args = c["args"]
    assert args[1] == "openai/gpt-oss-20b" and "--enable-lora" in args
    assert args[args.index("--lora-modules") + 1] == f"{RUN}=/models/adapter"
    assert args[args.index("--max-lora-rank") + 1] == "32"   # rounded up to a rank vLLM accepts
    env = {e["name"]: e for e in c["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
    assert "HF_HUB_OFFLINE" not in env


def test_adapter_errors_are_clear(tmp_path):
    make_run(tmp_path, method={"kind": "full"})
    with pytest.raises(GptossError, match="full fine-tune"):
        target(tmp_path, serve__adapter=True)


def test_adapter_missing_is_an_error(tmp_path):
    make_run(tmp_path)
    with pytest.raises(GptossError, match="no adapter"):
        target(tmp_path, serve__adapter=True)


def test_tiny_adapter_has_no_published_base(tmp_path):
    make_run(tmp_path, adapter=True, model={"name": "tiny"})
    with pytest.raises(GptossError, match="published base weights"):
        rs.deployment(target(tmp_path, serve__adapter=True))


def test_bad_tp_is_refused(tmp_path):
    make_run(tmp_path)
    with pytest.raises(GptossError, match="does not divide"):
        target(tmp_path, serve__tp=3)


def test_api_key_off_and_own_secret(tmp_path):
    make_run(tmp_path, serve={"api_key_secret": {"name": "team-key", "key": "k"}})
    env = {e["name"]: e for e in rs.deployment(target(tmp_path))["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "team-key", "key": "k"}
    env = {e["name"] for e in rs.deployment(target(tmp_path, serve__api_key=False))["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "VLLM_API_KEY" not in env


def test_cli_dry_run_prints_the_four_objects_and_a_curl(tmp_path, monkeypatch):
    make_run(tmp_path)
    secret_values = {"AWS_SECRET_ACCESS_KEY": "sekrit-aws-123", "HF_TOKEN": "hf_sekrit456", "VLLM_API_KEY": "sekrit-vllm-789"}
    for k, v in secret_values.items():
        monkeypatch.setenv(k, v)
    r = CliRunner().invoke(app, ["serve", RUN, "--store", str(tmp_path), "--backend", "k8s", "--dry-run", "-o", "yaml"])
    assert r.exit_code == 0, r.output
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert [d["kind"] for d in docs] == ["Job", "Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget"]
    assert "curl http://vllm-" in r.stderr and "/v1/chat/completions" in r.stderr and "Authorization: Bearer $VLLM_API_KEY" in r.stderr
    assert all(d["kind"] != "Secret" for d in docs)
    for v in secret_values.values():
        assert v not in r.output

    r = CliRunner().invoke(app, ["serve", RUN, "--store", str(tmp_path), "--backend", "k8s", "--dry-run", "-o", "json"])
    assert r.exit_code == 0, r.output
    assert [o["kind"] for o in json.loads(r.stdout)] == ["Job", "Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget"]


def test_cli_out_writes_one_file_per_object(tmp_path):
    make_run(tmp_path / "store", merged=True)
    r = CliRunner().invoke(app, ["serve", RUN, "--store", str(tmp_path / "store"), "--backend", "k8s", "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == [f"00-deployment-vllm-{RUN}.yaml", f"01-service-vllm-{RUN}.yaml", f"02-networkpolicy-vllm-{RUN}.yaml",
                     f"03-poddisruptionbudget-vllm-{RUN}.yaml"]


def test_unknown_run_is_one_clear_line(tmp_path):
    r = CliRunner().invoke(app, ["serve", "nope-20250101-000000-abcd", "--store", str(tmp_path), "--dry-run"])
    assert r.exit_code != 0 and isinstance(r.exception, GptossError) and "not found" in str(r.exception)


# ------------------------------------------------------------------------------------------ truss
def test_truss_config_loads_through_truss_and_serves_merged(tmp_path):
    from truss.base.truss_config import TrussConfig

    make_run(tmp_path, merged=True)
    t = target(tmp_path, cluster__backend="truss")
    with pytest.raises(GptossError, match="local store"):
        render_truss(t)
    cfg = render_truss(replace(t, home=f"s3://bucket/runs/{RUN}"))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    loaded = TrussConfig.from_yaml(tmp_path / "config.yaml")
    assert loaded.docker_server.start_command.startswith("python3 -m vllm.entrypoints.openai.api_server --model /models/merged ")
    assert "--middleware" not in loaded.docker_server.start_command   # Baseten's gateway holds the key
    assert "--tensor-parallel-size 4" in loaded.docker_server.start_command
    assert loaded.resources.accelerator.count == 4
    assert [w.source for w in loaded.weights.root] == [f"s3://bucket/runs/{RUN}/merged"]
    assert loaded.weights.root[0].auth_secret_name == "gptoss_store_aws"
    assert all(v is None for v in loaded.secrets.values())


def test_truss_adapter_mounts_base_and_adapter(tmp_path):
    from truss.base.truss_config import TrussConfig

    make_run(tmp_path, adapter=True, model={"name": "120b"})
    t = target(tmp_path, cluster__backend="truss", serve__adapter=True)
    cfg = render_truss(replace(t, home=f"s3://bucket/runs/{RUN}"))
    loaded = TrussConfig.from_dict(cfg)
    assert "--enable-lora" in loaded.docker_server.start_command
    assert cfg["weights"][0]["source"] == "hf://openai/gpt-oss-120b"


def test_truss_needs_published_weights(tmp_path):
    make_run(tmp_path)
    with pytest.raises(GptossError, match="gptoss-cloud merge"):
        render_truss(replace(target(tmp_path, cluster__backend="truss"), home=f"s3://bucket/runs/{RUN}"))


# ------------------------------------------------------------------------------------------ local
def test_local_without_vllm_points_to_chat(tmp_path):
    from gptoss_cloud.backends import local_serve as sl

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 1\n")   # an interpreter on which vllm cannot be found
    fake.chmod(0o755)
    with pytest.raises(GptossError) as e:
        sl.check_python(str(fake))
    assert "vLLM is not installed" in e.value.message and "--vllm-python" in e.value.hint
    with pytest.raises(GptossError, match="no such executable"):
        sl.check_python(str(tmp_path / "missing"))


def test_local_dry_run_command_points_at_the_merged_folder(tmp_path):
    make_run(tmp_path, merged=True, model={"name": "20b"})
    r = CliRunner().invoke(app, ["serve", RUN, "--store", str(tmp_path), "--backend", "local", "--dry-run",
                                 "--vllm-python", "/venv/bin/python", "--port", "18001"])
    assert r.exit_code == 0, r.output
    argv = r.stdout.splitlines()[0].split()
    assert argv[:5] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", str(tmp_path / RUN / "merged")]
    assert argv[argv.index("--port") + 1] == "18001" and argv[argv.index("--host") + 1] == "127.0.0.1"
    assert "--middleware" not in argv and "API key:  none" in r.stdout


def test_local_api_key_env_must_hold_a_key(tmp_path, monkeypatch):
    make_run(tmp_path, merged=True, model={"name": "20b"})
    monkeypatch.delenv("MY_KEY", raising=False)
    r = CliRunner().invoke(app, ["serve", RUN, "--store", str(tmp_path), "--backend", "local", "--dry-run", "--api-key-env", "MY_KEY"])
    assert r.exit_code != 0 and "--api-key-env MY_KEY" in str(r.exception)
    monkeypatch.setenv("MY_KEY", "k")
    r = CliRunner().invoke(app, ["serve", RUN, "--store", str(tmp_path), "--backend", "local", "--dry-run", "--api-key-env", "MY_KEY"])
    argv = r.stdout.splitlines()[0].split()
    assert argv[argv.index("--middleware") + 1] == "gptoss_serve_auth.ApiKeyMiddleware"
    assert "k" not in argv and "$MY_KEY" in r.stdout   # the key itself never appears in the command line


# ------------------------------------------------------------------------------- derived flags
def flag(args, name):
    return args[args.index(name) + 1]


def test_flags_come_from_the_model_and_the_spec_in_every_backend(tmp_path):
    """tiny: max_position_embeddings 8192 caps the spec's 32768 (vLLM's ModelConfig refuses more);
    gpt-oss parsers; the trained date reaches vLLM; k8s, Truss and local share one builder."""
    import shlex

    make_run(tmp_path, merged=True, model={"name": "tiny"}, data={"conversation_date": "2026-01-01"})
    t = target(tmp_path)
    (dep,) = [o for o in rs.serve_objects(t) if o["kind"] == "Deployment"]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert dep["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    k8s = c["args"]
    assert flag(k8s, "--max-model-len") == "8192"
    assert flag(k8s, "--tool-call-parser") == "openai" and "--enable-auto-tool-choice" in k8s
    assert flag(k8s, "--reasoning-parser") == "openai_gptoss"
    assert flag(k8s, "--middleware") == "gptoss_serve_auth.ApiKeyMiddleware"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["VLLM_SYSTEM_START_DATE"] == "2026-01-01" and env["PYTHONPATH"] == "/opt/gptoss/python"
    assert env["TIKTOKEN_ENCODINGS_BASE"] == "/opt/gptoss/tiktoken"

    truss = render_truss(replace(target(tmp_path, cluster__backend="truss"), home=f"s3://bucket/runs/{RUN}"))
    argv = shlex.split(truss["docker_server"]["start_command"])
    assert argv[3:] == [a for a in k8s if a not in ("--middleware", "gptoss_serve_auth.ApiKeyMiddleware")]
    assert truss["environment_variables"]["VLLM_SYSTEM_START_DATE"] == "2026-01-01"


def test_prompt_fields_vllm_cannot_reproduce_are_named(tmp_path):
    make_run(tmp_path, merged=True, data={"model_identity": "You are Oona.", "reasoning_effort": "low"})
    _, notes = resolve_target(RUN, str(tmp_path), {}, environ={})
    text = "\n".join(notes)
    assert "data.conversation_date is not set" in text and "model_identity" in text and "reasoning_effort" in text


def test_pdb_always_and_pod_monitor_on_request_are_valid_and_admitted(tmp_path):
    make_run(tmp_path, merged=True, serve={"pod_monitor": True})
    k = by_kind(rs.serve_objects(target(tmp_path)))
    validate_k8s(k["PodDisruptionBudget"])
    assert k["PodDisruptionBudget"]["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": rs.selector(RUN)}}
    pm = k["PodMonitor"]["spec"]
    assert pm["selector"]["matchLabels"] == rs.selector(RUN) and pm["podMetricsEndpoints"][0]["path"] == "/metrics"
    tmpl = k["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert tmpl["prometheus.io/scrape"] == "true" and tmpl["prometheus.io/port"] == "8000"
    admitted = k["NetworkPolicy"]["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchExpressions"][0]["values"]
    assert admitted == ["ml", "monitoring"]
    make_run(tmp_path / "b", merged=True)
    plain = by_kind(rs.serve_objects(target(tmp_path / "b")))
    assert "PodMonitor" not in plain and "annotations" not in plain["Deployment"]["spec"]["template"]["metadata"]
