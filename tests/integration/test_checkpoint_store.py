"""The object store and checkpoint publication, against a local folder and a real S3 HTTP server alike."""

from __future__ import annotations

import json
import os

import pytest

from gptoss_cloud.contract.store import objects as store_mod
from gptoss_cloud.contract.errors import StoreError
from gptoss_cloud.contract.store.objects import StoreNotFound, open_store, upload_files
from gptoss_cloud.trainer.checkpoint import manifest as cm


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket")


def test_store_contract(root, tmp_path):
    st = open_store(root)
    st.check_access()
    st.write_bytes("a/b.txt", b"hello")
    assert st.read_bytes("a/b.txt") == b"hello"
    assert st.exists("a/b.txt") and st.exists("a") and not st.exists("zz")
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(1000))
    upload_files(st, [(src, "a/c/d.bin"), (src, "a-other/e.bin")])
    # "a" is a folder: it must not also list "a-other/..."
    assert st.list("a") == ["a/b.txt", "a/c/d.bin"]
    assert st.child("a").list("") == ["b.txt", "c/d.bin"]
    st.download_file("a/c/d.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    with pytest.raises(StoreNotFound):
        st.read_bytes("a/missing")
    assert st.delete("a") == 2 and st.list("a") == []


def test_multipart_upload_is_used_and_round_trips(s3_bucket, tmp_path, monkeypatch):
    from boto3.s3.transfer import TransferConfig

    MiB = 1024 * 1024
    monkeypatch.setattr(store_mod, "_transfer_config",
                        lambda: TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4))
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * MiB))
    st = open_store(s3_bucket)
    st.upload_file(big, "big.bin")
    head = st.client.head_object(Bucket=st.bucket, Key=st._k("big.bin"))
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # a multipart ETag: 3 parts
    st.download_file("big.bin", tmp_path / "big2.bin")
    assert cm.sha256_file(big) == cm.sha256_file(tmp_path / "big2.bin")


# ------------------------------------------------------------------------------ errors: one line each
def _one_line(err: StoreError) -> str:
    msg = err.message
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_wrong_bucket_names_uri_and_code(s3_env):
    with pytest.raises(StoreError) as e:
        open_store("s3://no-such-bucket-xyz/runs").check_access()
    msg = _one_line(e.value)
    assert "s3://no-such-bucket-xyz/runs" in msg and "NoSuchBucket" in msg


def test_missing_credentials(s3_env, monkeypatch, tmp_path):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StoreError) as e:
        open_store("s3://somebucket/runs").check_access()
    msg = _one_line(e.value)
    assert "s3://somebucket/runs" in msg and "NoCredentialsError" in msg


def test_no_permission_and_bad_key(s3_iam_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_iam_server["url"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    key, secret = s3_iam_server["reader"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    st = open_store("s3://locked/runs")
    st.check_access(write=False)  # the reader may list
    with pytest.raises(StoreError) as e:
        st.check_access()  # but not write: refused before any training
    msg = _one_line(e.value)
    assert "s3://locked/runs" in msg and "AccessDenied" in msg
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    with pytest.raises(StoreError) as e:
        open_store("s3://locked/runs").check_access()
    assert "InvalidAccessKeyId" in _one_line(e.value)


# ---------------------------------------------------------------------------------------- publication
def _fake_checkpoint(ckpts, step, tmp_path, world=2):
    files = {}
    for r in range(world):
        p = tmp_path / f"s{step}-r{r}.bin"
        p.write_bytes(os.urandom(100) + bytes([r]))
        ckpts.upload_file(p, f"step-{step}/__{r}_0.distcp")
        cm.write_part(ckpts, step, r, {f"__{r}_0.distcp": cm.file_entry(p)}, attempt="a1")
    files = cm.read_parts(ckpts, step, world, attempt="a1")
    return cm.Manifest(step=step, world_size=world, files=files, spec_hash="abc", method="full")


def test_only_manifested_checkpoints_count_and_prune(root, tmp_path):
    ckpts = open_store(root).child("run1/checkpoints")
    for step in (10, 20, 30):
        m = _fake_checkpoint(ckpts, step, tmp_path)
        cm.publish(ckpts, m, None)
    _fake_checkpoint(ckpts, 40, tmp_path)  # uploaded, never published (the writer died)
    assert cm.read_parts(ckpts, 50, 2, attempt="a1") is None
    assert cm.list_published(ckpts) == [30, 20, 10]
    with pytest.raises(cm.CheckpointError, match="not published"):
        cm.read_manifest(ckpts, 40, None)
    m = cm.read_manifest(ckpts, 30, None)
    assert m.world_size == 2 and set(m.files) == {"__0_0.distcp", "__1_0.distcp"}
    _fake_checkpoint(ckpts, 50, tmp_path)
    cm.publish(ckpts, cm.Manifest(step=50, world_size=2, files=cm.read_parts(ckpts, 50, 2, attempt="a1")), None)
    dropped = cm.prune(ckpts, keep_last=2, newest=50)
    assert sorted(dropped) == [10, 20, 40]
    assert cm.list_published(ckpts) == [50, 30]
    assert cm.list_folders(ckpts) == {30, 50}


def test_signed_manifest_and_tampering(root, tmp_path):
    ckpts = open_store(root).child("run2/checkpoints")
    key = b"s3cret"
    cm.publish(ckpts, _fake_checkpoint(ckpts, 5, tmp_path), key)
    assert cm.read_manifest(ckpts, 5, key).signed
    # Someone with write access to the bucket swaps a shard and rewrites the checksum in the manifest.
    body = json.loads(ckpts.read_bytes("step-5/manifest.json"))
    body["files"]["__0_0.distcp"]["sha256"] = "0" * 64
    ckpts.write_bytes("step-5/manifest.json", json.dumps(body).encode())
    with pytest.raises(cm.CheckpointError, match="signature does not verify"):
        cm.read_manifest(ckpts, 5, key)
    # An unsigned manifest is refused once a key is set; without a key it is read (checksums only).
    cm.publish(ckpts, _fake_checkpoint(ckpts, 6, tmp_path), None)
    with pytest.raises(cm.CheckpointError, match="not signed"):
        cm.read_manifest(ckpts, 6, key)
    assert not cm.read_manifest(ckpts, 6, None).signed
    with pytest.raises(cm.CheckpointError, match="does not verify"):
        cm.read_manifest(open_store(root).child("run2/checkpoints"), 5, b"other-key")


def test_preflight_fails_before_training(s3_env, s3_bucket, tmp_path):
    from gptoss_cloud.contract.errors import PlanError
    from gptoss_cloud.contract.spec import RunSpec
    from gptoss_cloud.trainer.checkpoint.room import preflight

    tiny = RunSpec.model_validate({"model": {"name": "tiny"}, "checkpoint": {"local_dir": str(tmp_path / "ck")}})
    preflight(tiny, f"{s3_bucket}/run-ok")
    with pytest.raises(StoreError, match=r"s3://missing-bucket-q/run: NoSuchBucket"):
        preflight(tiny, "s3://missing-bucket-q/run")
    big = RunSpec.model_validate({"model": {"name": "120b"}, "method": {"kind": "full"},
                                  "checkpoint": {"local_dir": str(tmp_path / "ck")}})
    with pytest.raises(PlanError, match="GiB free; two checkpoints of this run need"):
        preflight(big, f"{s3_bucket}/run-big")
