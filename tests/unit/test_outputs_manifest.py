"""Published folders (merged/, adapter/, base/): manifests, signatures and the one prefix copier."""

from __future__ import annotations

import json
import os

import pytest

from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.contract.store.fetch import download_prefix, local_output
from gptoss_cloud.contract.integrity import KEY_ENV
from gptoss_cloud.contract.store.keys import UnsafeKeyError
from gptoss_cloud.contract.outputs import MANIFEST, OutputError, OutputManifest, open_output, publish_local_folder
from gptoss_cloud.contract.store.objects import open_store

KEY = b"s3cret"


def _folder(tmp_path, name="merged", key=KEY):
    src = tmp_path / "home" / name
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "w.safetensors").write_bytes(b"\x00" * 1000)
    publish_local_folder(open_store(src), src, key)
    return src


def test_signed_folder_round_trips_and_copies_only_what_the_manifest_names(tmp_path):
    src = _folder(tmp_path)
    (src / "planted.py").write_text("import os")  # written by someone else after the merge
    store = open_store(src)
    m = open_output(store, signed_spec=True, key=KEY)
    assert m.signed and sorted(m.files) == ["config.json", "sub/w.safetensors"]
    dest = tmp_path / "dest"
    assert sorted(download_prefix(store, "", dest, manifest=m)) == ["config.json", "sub/w.safetensors"]
    assert not (dest / "planted.py").exists() and not (dest / MANIFEST).exists()
    assert download_prefix(store, "", dest, manifest=m) == []  # verified copies are kept
    (dest / "config.json").write_text('{"a": 2}')  # a damaged local copy is fetched again
    assert download_prefix(store, "", dest, manifest=m) == ["config.json"]
    only = download_prefix(store, "", tmp_path / "only-json", manifest=m, keep=lambda rel: rel.endswith(".json"))
    assert only == ["config.json"] and not (tmp_path / "only-json" / "sub").exists()


def test_a_tampered_object_is_refused_naming_it(tmp_path):
    src = _folder(tmp_path)
    (src / "sub" / "w.safetensors").write_bytes(b"\x01" * 1000)  # same size, other bytes
    store = open_store(src)
    with pytest.raises(OutputError, match=r"sub/w.safetensors: sha256 mismatch"):
        download_prefix(store, "", tmp_path / "dest", manifest=open_output(store, signed_spec=True, key=KEY))


def test_the_manifest_itself_cannot_be_rewritten_or_moved_or_dropped(tmp_path):
    src = _folder(tmp_path)
    store = open_store(src)
    body = json.loads((src / MANIFEST).read_text())
    body["files"]["config.json"]["sha256"] = "0" * 64
    (src / MANIFEST).write_text(json.dumps(body))
    with pytest.raises(OutputError, match="signature does not verify"):
        open_output(store, signed_spec=False, key=KEY)
    moved = _folder(tmp_path / "other", name="adapter")
    (src / MANIFEST).write_bytes((moved / MANIFEST).read_bytes())
    with pytest.raises(OutputError, match="for folder 'adapter', not 'merged'"):
        open_output(store, signed_spec=False, key=KEY)
    (src / MANIFEST).unlink()
    with pytest.raises(OutputError, match="no gptoss-manifest.json; refusing an unsigned folder"):
        open_output(store, signed_spec=False, key=KEY)


def test_the_rules_without_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    signed = open_store(_folder(tmp_path / "a"))
    unsigned = open_store(_folder(tmp_path / "b", key=None))
    bare = tmp_path / "c" / "merged"
    bare.mkdir(parents=True)
    (bare / "config.json").write_text("{}")
    # The spec says signed: nothing is read unverified, signed or not.
    for store in (signed, unsigned, open_store(bare)):
        with pytest.raises(OutputError, match=f"spec says its outputs are signed|no {MANIFEST}"):
            open_output(store, signed_spec=True)
    # The spec does not: a manifest is still checked (sizes, hashes); an older folder reads as listed.
    assert not open_output(unsigned, signed_spec=False).signed
    assert open_output(open_store(bare), signed_spec=False) is None
    # A key in the environment is used by default.
    monkeypatch.setenv(KEY_ENV, "another")
    with pytest.raises(OutputError, match="does not verify"):
        open_output(signed, signed_spec=False)


@pytest.mark.parametrize("entry", ["../../x", "/etc/passwd", "a/../../b"])
def test_a_manifest_naming_an_escaping_key_is_refused(tmp_path, entry):
    m = OutputManifest(folder="merged", files={entry: {"size": 1, "sha256": "0" * 64}})
    with pytest.raises(OutputError, match="refusing key"):
        OutputManifest.from_json(m.to_json(KEY), "w", KEY, "merged")


def test_local_folders_are_verified_in_place_and_extras_there_refused(tmp_path, monkeypatch):
    src = _folder(tmp_path)
    with pytest.raises(OutputError, match=f"{KEY_ENV} is not set here"):
        local_output(str(src), tmp_path / "unused", signed=True)
    monkeypatch.setenv(KEY_ENV, KEY.decode())
    assert local_output(str(src), tmp_path / "unused", signed=True) == src
    assert not (tmp_path / "unused").exists()
    (src / "model.safetensors").write_bytes(b"x")  # transformers would load this before the index
    with pytest.raises(GptossError, match="model.safetensors: not listed in the folder's manifest"):
        local_output(str(src), tmp_path / "unused", signed=True)


def test_a_symlink_in_the_destination_does_not_lead_out(tmp_path):
    src = _folder(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", dest / "sub")
    store = open_store(src)
    with pytest.raises(UnsafeKeyError, match="resolves outside"):
        download_prefix(store, "", dest, manifest=open_output(store, signed_spec=True, key=KEY))
    assert not any((tmp_path / "outside").iterdir())


def test_republishing_a_local_folder_removes_only_what_an_earlier_manifest_of_ours_named(tmp_path):
    from gptoss_cloud.contract.outputs import entries, replace_local

    src = _folder(tmp_path, key=None)  # as training leaves adapter/: config.json, sub/w.safetensors
    (src / "notes.txt").write_text("the user's own file")
    (src / "config.json").write_text('{"a": 3}')  # rewritten by the merge; sub/w.safetensors is not
    m = replace_local(src, entries(src, ["config.json"]), KEY)
    assert sorted(m.files) == ["config.json"] and not (src / "sub" / "w.safetensors").exists()
    assert (src / "notes.txt").read_text() == "the user's own file"
    assert open_output(open_store(src), signed_spec=True, key=KEY).files == m.files
