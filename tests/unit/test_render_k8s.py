"""The JobSet renderer: real schemas (Kubernetes 1.33, JobSet v0.12 CRD), names, security, secrets."""

from __future__ import annotations

import copy
from datetime import datetime, timezone

import jsonschema
import kubernetes_validate
import pytest
import yaml

from gptoss_cloud import __version__
from gptoss_cloud.contract.errors import SpecError
from gptoss_cloud.render.k8s import jobset as rk
from gptoss_cloud.contract.runs import new_run_id
from gptoss_cloud.contract.spec import RunSpec
from k8s_schemas import check_jobset_webhook_rules, validate_jobset, validate_object

SECRET_VALUES = ["AKIAEXAMPLEKEY", "wJalrXUtnFEMI/K7MDENG", "hf_supersecret"]


def spec(**tree) -> RunSpec:
    base = {"name": "ft", "model": {"name": "120b"}, "parallelism": {"nodes": 2, "gpus_per_node": 8},
            "cluster": {"backend": "k8s", "namespace": "ml"}}
    for k, v in tree.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return RunSpec.model_validate(base)


RUN = "ft-20250101-120000-abcd"


def _container(js):
    return js["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]


def _pod(js):
    return js["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]


def test_two_nodes_of_eight_h100_validates_against_real_schemas():
    cm, js = rk.render_run(spec(), RUN)
    validate_object(cm)
    validate_object(js)
    job = js["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert job["parallelism"] == job["completions"] == 2 and job["completionMode"] == "Indexed"
    assert js["spec"]["network"]["enableDNSHostnames"] is True
    assert js["spec"]["failurePolicy"]["maxRestarts"] == 3
    assert js["spec"]["ttlSecondsAfterFinished"] == 86400
    c = _container(js)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
    env = {e["name"]: e for e in c["env"]}
    assert env["MASTER_ADDR"]["value"] == f"{RUN}-w-0-0.{RUN}"
    assert env["NNODES"]["value"] == "2" and env["NPROC"]["value"] == "8" and env["MASTER_PORT"]["value"] == "29500"
    assert "job-completion-index" in env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert c["command"][-4:] == ["train", rk.SPEC_PATH, "--run-id", RUN]
    assert "--node-rank=$(NODE_RANK)" in c["command"]
    pod = _pod(js)["spec"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in pod["volumes"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    # The pods read the same spec the CLI resolved.
    assert RunSpec.model_validate(yaml.safe_load(cm["data"]["spec.yaml"])) == spec()


def test_image_defaults_to_package_version():
    assert _container(rk.jobset(spec(), RUN))["image"] == f"ghcr.io/gptoss-cloud/trainer:{__version__}"
    assert _container(rk.jobset(spec(cluster={"image": "reg.example/t:1"}), RUN))["image"] == "reg.example/t:1"


def test_restricted_pod_security_by_default():
    js = rk.jobset(spec(), RUN)
    pod = _pod(js)
    sc = pod["spec"]["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["seccompProfile"]["type"] == "RuntimeDefault"
    for c in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
        csc = c["securityContext"]
        assert csc["allowPrivilegeEscalation"] is False
        assert csc["capabilities"] == {"drop": ["ALL"]}
    assert not any("hostPath" in v for v in pod["spec"]["volumes"])
    assert pod["metadata"]["annotations"][rk.POD_SECURITY_ANNOTATION] == "restricted"


@pytest.mark.parametrize("rdma,resource,host_path", [("efa", "vpc.amazonaws.com/efa", False), ("infiniband", "rdma/rdma_shared_device_a", True)])
def test_rdma_relaxes_exactly_what_it_needs(rdma, resource, host_path):
    js = rk.jobset(spec(cluster={"namespace": "ml", "rdma": rdma}), RUN)
    validate_jobset(js)
    c = _container(js)
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert resource in c["resources"]["limits"]
    vols = _pod(js)["spec"]["volumes"]
    assert any(v.get("hostPath", {}).get("path") == "/dev/infiniband" for v in vols) is host_path
    note = js["metadata"]["annotations"][rk.POD_SECURITY_ANNOTATION]
    assert "IPC_LOCK" in note and resource in note


def test_optional_scheduling_fields_and_kueue():
    s = spec(cluster={
        "namespace": "ml", "queue": "gpu-queue", "priority_class": "training", "service_account": "trainer-irsa",
        "node_selector": {"node.kubernetes.io/instance-type": "p5.48xlarge"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["us-east-1a"]}]}]}}},
        "max_restarts": 5, "ttl_seconds_after_finished": None, "cache_storage_class": "local-nvme",
    })
    cm, js = rk.render_run(s, RUN)
    validate_object(js)
    assert js["metadata"]["labels"][rk.KUEUE_LABEL] == "gpu-queue"
    pod = _pod(js)["spec"]
    assert pod["priorityClassName"] == "training" and pod["serviceAccountName"] == "trainer-irsa"
    assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "p5.48xlarge"}
    assert len(pod["tolerations"]) == 2 and "affinity" in pod
    assert js["spec"]["failurePolicy"]["maxRestarts"] == 5 and "ttlSecondsAfterFinished" not in js["spec"]
    cache = next(v for v in pod["volumes"] if v["name"] == "cache")
    assert cache["ephemeral"]["volumeClaimTemplate"]["spec"]["storageClassName"] == "local-nvme"


def test_weights_from_hub_are_fetched_once_per_node():
    pod = _pod(rk.jobset(spec(), RUN))["spec"]
    init = pod["initContainers"][0]
    assert init["command"][:3] == ["hf", "download", "openai/gpt-oss-120b"]
    env = {e["name"]: e.get("value") for e in _container({"spec": {"replicatedJobs": [{"template": {"spec": {"template": {"spec": pod}}}}]}})["env"]}
    assert env["HF_HUB_CACHE"] == rk.HF_CACHE  # the trainer finds the fetched weights in the same cache


def test_weights_from_s3_mirror_become_a_local_folder_for_the_pods():
    s = spec(cluster={"namespace": "ml", "weights_mirror": "s3://mirror/gpt-oss-120b", "store_secret": {"name": "s3-creds"}})
    cm, js = rk.render_run(s, RUN)
    validate_object(cm)
    init = _pod(js)["spec"]["initContainers"][0]
    assert init["command"][0] == "python" and init["command"][-2:] == ["s3://mirror/gpt-oss-120b", rk.MIRROR_DIR]
    assert init["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    compile(init["command"][2], "<fetch>", "exec")  # the inline program is valid Python
    pod_spec = yaml.safe_load(cm["data"]["spec.yaml"])
    assert pod_spec["model"]["name"] == rk.MIRROR_DIR


def test_random_init_downloads_nothing():
    pod = _pod(rk.jobset(spec(model={"name": "20b", "init": "random"}), RUN))["spec"]
    assert "initContainers" not in pod


def test_secrets_only_as_references():
    s = spec(cluster={"namespace": "ml", "store_secret": {"name": "s3-creds"}, "hf_token_secret": {"name": "hf", "key": "tok"},
                      "env": {"AWS_ENDPOINT_URL": "http://minio:9000"}})
    text = rk.to_yaml(rk.render_run(s, RUN))
    c = _container(rk.jobset(s, RUN))
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "tok"}}} in c["env"]
    assert c["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    for obj in yaml.safe_load_all(text):
        assert obj["kind"] != "Secret"
    for value in SECRET_VALUES:
        assert value not in text


def test_store_secret_key_refused():
    with pytest.raises(SpecError, match="store_secret.key"):
        rk.jobset(spec(cluster={"namespace": "ml", "store_secret": {"name": "s", "key": "k"}}), RUN)


# ---- names ----------------------------------------------------------------------------------
def test_every_run_id_from_the_longest_name_fits_63():
    name = "a" * 30
    rid = new_run_id(name, datetime(2025, 1, 1, tzinfo=timezone.utc))
    js = rk.jobset(spec(name=name, parallelism={"nodes": 64, "gpus_per_node": 8}), rid)
    check_jobset_webhook_rules(js)
    validate_jobset(js)


def test_too_long_run_id_refused_with_the_rule():
    with pytest.raises(SpecError, match="at most 63"):
        rk.jobset(spec(), "a" * 60)


def test_run_id_starting_with_digit_refused_with_the_rule():
    with pytest.raises(SpecError, match="DNS-1035.*starting with a letter"):
        rk.jobset(spec(), "20b-20250101-120000-abcd")


def test_invalid_characters_refused():
    with pytest.raises(SpecError, match="DNS-1123"):
        rk.render_run(spec(cluster={"namespace": "ML_Team"}), RUN)
    with pytest.raises(SpecError, match="cluster.queue"):
        rk.jobset(spec(cluster={"namespace": "ml", "queue": "GPU queue"}), RUN)


# ---- the validators themselves catch mistakes (so the tests above can fail) ------------------
def test_schema_check_rejects_unknown_and_wrong_fields():
    js = rk.jobset(spec(), RUN)
    bad = copy.deepcopy(js)
    bad["spec"]["replicatedJobs"][0]["replicaz"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_jobset(bad)
    bad = copy.deepcopy(js)
    _container(bad)["resourcez"] = {}
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.utils.ValidationError)):
        validate_jobset(bad)
    bad = copy.deepcopy(js)
    bad["spec"]["failurePolicy"]["maxRestarts"] = "three"
    with pytest.raises(jsonschema.ValidationError):
        validate_jobset(bad)
    bad = copy.deepcopy(js)
    bad["spec"]["replicatedJobs"][0]["template"]["spec"]["completionMode"] = "NonIndexed"
    with pytest.raises(AssertionError):
        check_jobset_webhook_rules(bad)


def test_dry_run_of_120b_on_two_nodes_validates_and_full_is_refused(tmp_path):
    from gptoss_cloud.backends.base import SubmitOptions, get_backend
    from gptoss_cloud.contract.errors import PlanError

    s = spec()
    res = get_backend("k8s").submit(s, RUN, f"s3://bucket/runs/{RUN}", SubmitOptions(dry_run=True))
    objs = list(yaml.safe_load_all(res.rendered))
    assert [o["kind"] for o in objs] == ["ConfigMap", "JobSet"]
    for o in objs:
        validate_object(o)
    full = spec(method={"kind": "full"}, optim={"name": "adamw"})  # named: submit keeps it, so it cannot fit
    with pytest.raises(PlanError, match=r"needs \d+\.\d GiB per GPU"):
        get_backend("k8s").submit(full, RUN, f"s3://bucket/runs/{RUN}", SubmitOptions(dry_run=True))
