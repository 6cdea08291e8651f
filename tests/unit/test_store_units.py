"""Pure pieces of the store and of checkpoint manifests (no server, no torch)."""

from __future__ import annotations

import json

import pytest

from gptoss_cloud.contract.errors import StoreError
from gptoss_cloud.contract.store.objects import LocalStore, StoreNotFound, open_store, translate_aws_error


def test_local_store_not_found_and_atomic_write(tmp_path):
    st = open_store(f"file://{tmp_path}/s")
    assert isinstance(st, LocalStore)
    with pytest.raises(StoreNotFound):
        st.read_bytes("nope")
    st.write_bytes("a/b", b"x")
    assert [p.name for p in (tmp_path / "s" / "a").iterdir()] == ["b"]  # no leftover temp file
    with pytest.raises(StoreError, match="unsupported store URI"):
        open_store("gs://bucket/x")


def test_aws_error_code_from_transfer_manager_text():
    class S3UploadFailedError(Exception):
        pass

    e = S3UploadFailedError("Failed to upload x to b/k: An error occurred (AccessDenied) when calling the PutObject operation")
    err = translate_aws_error(e, "s3://b/k", "upload")
    assert err.message == "upload s3://b/k: AccessDenied" and "permission" in err.hint


def test_manifest_signature_covers_every_field():
    from gptoss_cloud.trainer.checkpoint.manifest import CheckpointError, Manifest

    m = Manifest(step=3, world_size=2, files={"a": {"size": 1, "sha256": "0" * 64}}, spec_hash="h")
    signed = m.to_json(b"k")
    assert Manifest.from_json(signed, "w", b"k").signed
    for field, value in (("step", 4), ("world_size", 1), ("spec_hash", "other")):
        body = json.loads(signed)
        body[field] = value
        with pytest.raises(CheckpointError, match="signature does not verify"):
            Manifest.from_json(json.dumps(body).encode(), "w", b"k")
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        Manifest.from_json(b"{not json", "w", None)
