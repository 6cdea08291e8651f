"""A writable bucket never becomes a write anywhere else: traversal keys planted in every fetch path.

Each test puts objects with keys such as ``r1/merged/../../escaped`` on a real S3 server (moto, which
stores such keys as given, as S3 does) and runs the real reader: the serve fetcher, chat, push,
resume, the merge, the training pods' weights download and the rendered weights-mirror init
container. Each must refuse with the key named and leave nothing outside its folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gptoss_cloud.trainer.programs import serve_fetch
from gptoss_cloud.contract.store.keys import UnsafeKeyError
from gptoss_cloud.contract.spec import RunSpec
from gptoss_cloud.contract.store.objects import join, open_store

ESCAPE = "../../../escaped"  # from <tmp>/a/b/<folder> this lands in <tmp>/escaped


def _home(bucket: str, spec: dict | None = None) -> str:
    home = join(bucket, "r1")
    open_store(home).write_bytes("spec.yaml", RunSpec.model_validate(spec or {}).to_yaml().encode())
    return home


def _plant(uri: str, folder: str, extra: dict[str, bytes] | None = None) -> None:
    st = open_store(uri)
    for k, v in {"config.json": b"{}", f"{ESCAPE}": b"pwned", **(extra or {})}.items():
        st.write_bytes(f"{folder}/{k}" if folder else k, v)


def _nothing_escaped(tmp_path) -> None:
    assert not [p for p in tmp_path.rglob("escaped*")], "a planted key was written outside its folder"


def test_serve_fetch_refuses_a_planted_key(s3_bucket, tmp_path, capsys):
    home = _home(s3_bucket)
    _plant(home, "merged")
    dest = tmp_path / "a" / "b" / "merged"
    with pytest.raises(UnsafeKeyError, match=r"refusing key '\.\./\.\./\.\./escaped'"):
        serve_fetch.fetch(join(home, "merged"), dest, log=lambda m: None)
    assert serve_fetch.main([join(home, "merged"), str(dest)]) == 1
    assert "refusing key" in capsys.readouterr().err
    _nothing_escaped(tmp_path)


def test_serve_fetch_refuses_a_planted_key_beside_a_signed_manifest(s3_bucket, tmp_path, monkeypatch):
    from gptoss_cloud.contract.outputs import publish

    monkeypatch.setenv("GPTOSS_CHECKPOINT_KEY", "k")
    home = _home(s3_bucket)
    publish(open_store(join(home, "merged")), {}, b"k")
    _plant(home, "merged")
    with pytest.raises(UnsafeKeyError, match="refusing key"):
        serve_fetch.fetch(join(home, "merged"), tmp_path / "a" / "b" / "merged", log=lambda m: None, signed=True)
    _nothing_escaped(tmp_path)


def test_chat_refuses_a_planted_key(s3_bucket, tmp_path, monkeypatch):
    from gptoss_cloud.trainer.chat import load_run_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a"))
    home = _home(s3_bucket)
    _plant(home, "merged")  # the cache folder is <tmp>/a/gptoss-cloud/runs/r1/merged
    with pytest.raises(UnsafeKeyError, match="refusing key"):
        load_run_model(home, RunSpec.model_validate({}), device="cpu")
    _nothing_escaped(tmp_path)


def test_push_refuses_a_planted_key_before_anything_is_uploaded(s3_bucket, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from gptoss_cloud.main import app

    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "a" / "b"))  # push fetches into <TMPDIR>/<tmp>/merged
    (tmp_path / "a" / "b").mkdir(parents=True)
    home = _home(s3_bucket)
    # published (its index written), so push picks the folder and reaches the fetch
    _plant(home, "merged", {"../../escaped-too": b"pwned", "model.safetensors.index.json": b"{}"})
    r = CliRunner().invoke(app, ["push", home, "--to", "hf://org/name"])
    assert r.exit_code != 0 and isinstance(r.exception, UnsafeKeyError), r.output
    _nothing_escaped(tmp_path)


def test_resume_refuses_a_manifest_entry_that_escapes(s3_bucket):
    from gptoss_cloud.trainer.checkpoint import manifest as cm

    ckpts = open_store(join(s3_bucket, "r1", "checkpoints"))
    m = cm.Manifest(step=3, world_size=1, files={"__0_/../../x.distcp": {"size": 1, "sha256": "0" * 64}})
    cm.publish(ckpts, m, None)
    with pytest.raises(cm.CheckpointError, match=r"refusing key '__0_/\.\./\.\./x\.distcp'"):
        cm.read_manifest(ckpts, 3, None)
    cm.write_part(ckpts, 4, 0, {"/etc/cron.d/x": {"size": 1, "sha256": "0" * 64}}, attempt="a1")
    with pytest.raises(cm.CheckpointError, match="rank-0.json: refusing key '/etc/cron.d/x'"):
        cm.read_parts(ckpts, 4, 1, attempt="a1")


def test_resume_fetches_only_what_the_manifest_names(s3_bucket, tmp_path):
    """DCP's .metadata names the files to read too; one it names outside the manifest is never downloaded."""
    from gptoss_cloud.trainer.checkpoint import manifest as cm
    from gptoss_cloud.trainer.checkpoint.resume import make_fetcher

    ckpts = open_store(join(s3_bucket, "r1", "checkpoints"))
    ckpts.write_bytes(f"step-3/{ESCAPE}", b"pwned")
    m = cm.Manifest(step=3, world_size=1, files={})
    fetch = make_fetcher(ckpts, 3, tmp_path / "a" / "b" / "step-3", m, "w")
    with pytest.raises(cm.CheckpointError, match="not listed in the manifest"):
        fetch([ESCAPE])
    _nothing_escaped(tmp_path)


def test_resume_from_a_tampered_manifest_falls_back_to_an_intact_checkpoint(s3_bucket, tmp_path, monkeypatch):
    import torch

    from gptoss_cloud.trainer.checkpoint import manifest as cm
    from gptoss_cloud.trainer.checkpoint.checkpointer import Checkpointer

    spec = RunSpec.model_validate({"checkpoint": {"local_dir": str(tmp_path / "a" / "b" / "local")}})
    home = join(s3_bucket, "r1")
    model = torch.nn.Linear(4, 4)
    ck = Checkpointer(spec.checkpoint, home, spec=spec)
    ck.restore({"model": model})
    ck.save(1, {"model": model})
    ck.close()
    ckpts = open_store(join(home, "checkpoints"))
    good = cm.read_manifest(ckpts, 1, None)
    files = dict(good.files, **{f"__0_/{ESCAPE}.distcp": {"size": 5, "sha256": "0" * 64}})
    ckpts.write_bytes(f"step-2/__0_/{ESCAPE}.distcp", b"pwned")
    cm.publish(ckpts, cm.Manifest(step=2, world_size=1, files=files, spec_hash=good.spec_hash), None)
    ck = Checkpointer(spec.checkpoint, home, spec=spec)
    assert ck.restore({"model": torch.nn.Linear(4, 4)}) == 1
    ck.close()
    _nothing_escaped(tmp_path)


def test_merge_refuses_a_planted_key_in_the_base_folder_and_in_a_base_mirror(s3_bucket, tmp_path):
    from gptoss_cloud.trainer.merge.base import resolve_base

    home = _home(s3_bucket)
    _plant(home, "base")
    with pytest.raises(UnsafeKeyError, match="refusing key"):
        resolve_base(home, None, None, tmp_path / "a" / "b")
    mirror = join(s3_bucket, "mirror")
    _plant(mirror, "")
    with pytest.raises(UnsafeKeyError, match="refusing key"):
        resolve_base(home, None, mirror, tmp_path / "a" / "b")
    _nothing_escaped(tmp_path)


def test_training_weights_download_refuses_a_planted_key(s3_bucket, tmp_path):
    from gptoss_cloud.trainer.weights import fetch_pretrained

    mirror = join(s3_bucket, "mirror")
    _plant(mirror, "", {"model.safetensors": b"x", "../../../escaped.safetensors": b"pwned"})
    with pytest.raises(UnsafeKeyError, match="refusing key"):
        fetch_pretrained(mirror, cache_dir=str(tmp_path / "a" / "b"))
    _nothing_escaped(tmp_path)


def test_the_rendered_weights_mirror_init_container_refuses_a_planted_key(s3_bucket, s3_env, tmp_path):
    """The init container's command exactly as rendered, run as a real process (only the volume path differs)."""
    from gptoss_cloud.render.k8s.jobset import MIRROR_DIR, weights_init_container

    mirror = join(s3_bucket, "mirror")
    spec = RunSpec.model_validate({"model": {"name": "20b"}, "cluster": {"weights_mirror": mirror}})
    cmd = weights_init_container(spec, "img", [], [])["command"]
    assert MIRROR_DIR in cmd and cmd[0] == "python"
    dest = tmp_path / "a" / "b" / "mirror"
    argv = [sys.executable] + [str(dest) if c == MIRROR_DIR else c for c in cmd[1:]]
    env = dict(os.environ, **s3_env)

    open_store(mirror).write_bytes("config.json", b"{}")
    ok = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((dest / "config.json").read_text()) == {} and (dest / ".complete").read_text() == mirror

    _plant(mirror, "")
    (dest / ".complete").unlink()
    bad = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "refusing key '../../../escaped'" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr and not (dest / ".complete").exists()
    _nothing_escaped(tmp_path)
