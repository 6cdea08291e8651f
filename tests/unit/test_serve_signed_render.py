"""Every pod that reads or writes a run's signed outputs gets the checkpoint key, by reference only."""

from __future__ import annotations

import pytest
import yaml

from gptoss_cloud.render.k8s import serve as rs
from k8s_schemas import validate_object
from test_serve_render import by_kind, make_run, target

KEY_REF = {"name": "ckpt-key", "key": "hmac"}
SIGNED = {"backend": "k8s", "namespace": "ml", "store_secret": {"name": "store-creds"}, "checkpoint_key_secret": KEY_REF}


def _env(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def test_the_merge_job_and_the_weights_fetcher_get_the_key_and_verify(tmp_path):
    make_run(tmp_path, cluster=SIGNED)
    k = by_kind(rs.serve_objects(target(tmp_path)))
    merge = k["Job"]["spec"]["template"]["spec"]["containers"][0]
    assert _env(merge)["GPTOSS_CHECKPOINT_KEY"]["valueFrom"] == {"secretKeyRef": KEY_REF}
    fetch = k["Deployment"]["spec"]["template"]["spec"]["initContainers"][0]
    assert _env(fetch)["GPTOSS_CHECKPOINT_KEY"]["valueFrom"] == {"secretKeyRef": KEY_REF}
    assert "--signed" in fetch["command"]
    vllm = k["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert "GPTOSS_CHECKPOINT_KEY" not in _env(vllm)  # the server reads only the verified volume
    for o in k.values():
        validate_object(o)
    assert "hmac" in yaml.safe_dump(k["Job"]) and "value: hmac" not in yaml.safe_dump(k["Job"])


def test_the_adapter_fetcher_verifies_but_a_base_mirror_is_copied_as_listed(tmp_path):
    make_run(tmp_path, adapter=True, model={"name": "s3://bucket/mirrors/gpt-oss-20b"}, method={"kind": "lora"},
             cluster=SIGNED)
    init = by_kind(rs.serve_objects(target(tmp_path, serve__adapter=True)))["Deployment"]["spec"]["template"]["spec"]["initContainers"]
    by_name = {c["name"]: c for c in init}
    assert "--signed" in by_name["fetch-adapter"]["command"] and "GPTOSS_CHECKPOINT_KEY" in _env(by_name["fetch-adapter"])
    base = by_name["fetch-base"]
    assert "--no-manifest" in base["command"] and "--signed" not in base["command"]
    assert "GPTOSS_CHECKPOINT_KEY" not in _env(base)


@pytest.mark.parametrize("adapter", [False, True])
def test_without_a_key_secret_nothing_refers_to_one(tmp_path, adapter):
    make_run(tmp_path, adapter=adapter, model={"name": "20b"}, **({"method": {"kind": "lora"}} if adapter else {}))
    text = yaml.safe_dump_all(rs.serve_objects(target(tmp_path, serve__adapter=adapter)))
    assert "GPTOSS_CHECKPOINT_KEY" not in text and "--signed" not in text


def test_serve_local_hands_vllm_only_a_verified_folder(tmp_path, monkeypatch):
    from gptoss_cloud.backends import local_serve as serve_local
    from gptoss_cloud.contract.outputs import OutputError, publish_local_folder
    from gptoss_cloud.contract.store.objects import open_store

    home = make_run(tmp_path, merged=True, model={"name": "20b"}, cluster={**SIGNED, "backend": "local"})
    merged = home / "merged"
    monkeypatch.setenv("GPTOSS_CHECKPOINT_KEY", "k")
    publish_local_folder(open_store(merged), merged, b"k")
    t = target(tmp_path, cluster__backend="local")
    assert serve_local.model_folder(t, tmp_path / "cache") == merged  # verified in place
    (merged / "config.json").write_text('{"planted": true}')
    with pytest.raises(OutputError, match="merged/config.json: size"):
        serve_local.model_folder(t, tmp_path / "cache")
    monkeypatch.delenv("GPTOSS_CHECKPOINT_KEY")
    with pytest.raises(OutputError, match="GPTOSS_CHECKPOINT_KEY is not set here"):
        serve_local.model_folder(t, tmp_path / "cache")
