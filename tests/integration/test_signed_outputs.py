"""Signed outputs end to end on a real S3 server: a LoRA run's base/, its merge's merged/ and adapter/
are published with signed manifests, and every reader (merge, the serve fetcher, chat, push) refuses
tampered or unsigned folders, and refuses to read a signed run at all without the key."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from ckpt_worker import DataPosition, build_model  # noqa: E402
from gptoss_cloud.trainer.programs import serve_fetch  # noqa: E402
from gptoss_cloud.contract.integrity import KEY_ENV  # noqa: E402
from gptoss_cloud.contract.outputs import MANIFEST, OutputError, open_output  # noqa: E402
from gptoss_cloud.contract.spec import RunSpec  # noqa: E402
from gptoss_cloud.contract.store.objects import join, open_store  # noqa: E402

KEY = "hmac-key-for-tests"
SPEC = {"method": {"kind": "lora"}, "cluster": {"checkpoint_key_secret": {"name": "ckpt-key"}}}


def _signed_lora_run(home: str) -> RunSpec:
    """A LoRA run trained and checkpointed with the key set, its spec naming the key's Secret."""
    from gptoss_cloud.trainer.checkpoint.checkpointer import Checkpointer
    from gptoss_cloud.trainer.train import save_base

    spec = RunSpec.model_validate(SPEC)
    open_store(home).write_bytes("spec.yaml", spec.to_yaml().encode())
    save_base(build_model("full"), home)
    model = build_model("lora")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    state = {"model": model, "optimizer": opt, "data": DataPosition(1, 0)}
    ck = Checkpointer(spec.checkpoint, home, spec=spec)
    assert ck.restore(state) == 0
    ids = state["data"].next_batch(8, 64)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    ck.save(1, state)
    ck.close()
    return spec


@pytest.fixture
def run(s3_bucket, monkeypatch, tmp_path):
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    home = join(s3_bucket, "r1")
    spec = _signed_lora_run(home)
    return home, spec


def test_merge_without_the_key_refuses_and_with_it_publishes_signed_folders(run, monkeypatch):
    from gptoss_cloud.trainer.checkpoint.manifest import CheckpointError
    from gptoss_cloud.trainer.merge.export import merge

    home, _ = run
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(CheckpointError, match=f"spec says its checkpoints are signed.*{KEY_ENV} is not set here"):
        merge(home, join(home, "merged"))
    assert open_store(join(home, "merged")).list() == []
    monkeypatch.setenv(KEY_ENV, KEY)
    res = merge(home, join(home, "merged"))
    for folder in ("base", "merged", "adapter"):
        m = open_output(open_store(join(home, folder)), signed_spec=True)
        assert m.signed and m.files, folder
    assert set(open_output(open_store(join(home, "merged")), signed_spec=True).files) == set(res.files)


def test_a_tampered_base_is_refused_by_the_merge(run):
    from gptoss_cloud.trainer.merge.export import merge

    home, _ = run
    base = open_store(join(home, "base"))
    weights = base.read_bytes("model.safetensors")
    base.write_bytes("model.safetensors", weights[:-4] + b"\x00\x00\x80\x7f")  # one weight becomes +inf
    with pytest.raises(OutputError, match=r"base/model.safetensors: sha256 mismatch"):
        merge(home, join(home, "merged"))


def test_every_reader_refuses_a_tampered_merged_object(run, tmp_path, monkeypatch, capsys):
    from typer.testing import CliRunner

    from gptoss_cloud.main import app
    from gptoss_cloud.trainer.chat import load_run_model
    from gptoss_cloud.trainer.merge.export import merge

    home, spec = run
    merge(home, join(home, "merged"))
    src = join(home, "merged")
    assert serve_fetch.main([src, str(tmp_path / "ok"), "--signed"]) == 0
    model, source = load_run_model(home, spec, device="cpu")
    assert source == src
    merged = open_store(src)
    cfg = merged.read_bytes("config.json")
    merged.write_bytes("config.json", cfg.replace(b'"num_hidden_layers"', b'"num_hidden_layers" '))
    capsys.readouterr()
    assert serve_fetch.main([src, str(tmp_path / "pod"), "--signed"]) == 1
    assert "merged/config.json: size" in capsys.readouterr().err
    load_run_model(home, spec, device="cpu")  # the verified copy already in the cache is what loads
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "fresh-cache"))
    with pytest.raises(OutputError, match="merged/config.json: size"):
        load_run_model(home, spec, device="cpu")
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    r = CliRunner().invoke(app, ["push", home, "--to", "hf://org/name"])
    assert r.exit_code != 0 and isinstance(r.exception, OutputError) and "config.json" in str(r.exception)


def test_an_unsigned_merged_folder_is_refused_when_the_spec_says_signed(run, tmp_path, monkeypatch, capsys):
    from gptoss_cloud.contract.outputs import OutputManifest
    from gptoss_cloud.trainer.chat import load_run_model
    from gptoss_cloud.trainer.merge.export import merge

    home, spec = run
    merge(home, join(home, "merged"))
    merged = open_store(join(home, "merged"))
    unsigned = OutputManifest(folder="merged", files=open_output(merged, signed_spec=True).files)
    merged.write_bytes(MANIFEST, unsigned.to_json(None))  # what someone with bucket access could write
    assert serve_fetch.main([join(home, "merged"), str(tmp_path / "pod"), "--signed"]) == 1
    assert "not signed" in capsys.readouterr().err
    with pytest.raises(OutputError, match="not signed"):
        load_run_model(home, spec, device="cpu")
    # Without the key, nothing of the run is read at all: not unsigned, not signed.
    monkeypatch.delenv(KEY_ENV)
    assert serve_fetch.main([join(home, "adapter"), str(tmp_path / "pod2"), "--signed"]) == 1
    assert f"{KEY_ENV} is not set here" in capsys.readouterr().err
    merged.client.delete_object(Bucket=merged.bucket, Key=merged._k(MANIFEST))  # (not Store.delete: a prefix delete)
    with pytest.raises(OutputError, match="no gptoss-manifest.json"):
        load_run_model(home, spec, device="cpu")


def test_a_local_home_verifies_in_place_after_training_and_merge(tmp_path, monkeypatch):
    """The merge rewrites adapter/ in place: what training left there and the merge did not rewrite
    (peft's README.md) goes, so the folder holds exactly what its manifest names."""
    from gptoss_cloud.contract.store.fetch import local_output
    from gptoss_cloud.trainer.merge.export import merge
    from gptoss_cloud.trainer.train import _put_folder

    monkeypatch.setenv(KEY_ENV, KEY)
    home = str(tmp_path / "r1")
    _signed_lora_run(home)
    adapter = tmp_path / "r1" / "adapter"
    adapter.mkdir()
    (adapter / "README.md").write_text("written by peft's save_pretrained")
    (adapter / "adapter_config.json").write_text("{}")
    _put_folder(adapter, home, "adapter")  # as training publishes it
    merge(home, join(home, "merged"))
    assert not (adapter / "README.md").exists()
    for folder in ("base", "merged", "adapter"):
        assert local_output(join(home, folder), tmp_path / "unused", signed=True) == tmp_path / "r1" / folder
    assert not (tmp_path / "unused").exists()


def test_the_rendered_weights_init_container_verifies_as_a_real_process(run, s3_env, tmp_path):
    """The vLLM pod's fetch-weights command exactly as rendered (only the volume paths differ), run
    with the environment its Secret references would give it."""
    import os
    import subprocess

    from gptoss_cloud.render.k8s import serve as rs
    from gptoss_cloud.backends.serving import resolve_target
    from gptoss_cloud.trainer.merge.export import merge

    home, _ = run
    merge(home, join(home, "merged"))
    t, _ = resolve_target(home, "unused", {"cluster.backend": "k8s"}, environ={})
    init = rs.deployment(t)["spec"]["template"]["spec"]["initContainers"][0]
    assert init["name"] == "fetch-weights" and "--signed" in init["command"]
    def run_init(key: str | None, volume) -> subprocess.CompletedProcess:
        argv = [sys.executable] + [c.replace(rs.MODELS_DIR, str(volume)) for c in init["command"][1:]]
        env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
        env.update(s3_env, **({KEY_ENV: key} if key else {}))
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)

    volume = tmp_path / "models"
    ok = run_init(KEY, volume)
    assert ok.returncode == 0, ok.stderr
    assert (volume / "merged" / "config.json").is_file() and not (volume / "merged" / MANIFEST).exists()
    merged = open_store(join(home, "merged"))
    merged.write_bytes("generation_config.json", b'{"do_sample": false}')
    assert run_init(KEY, volume).returncode == 0  # a restarted pod keeps the copies that verified
    bad = run_init(KEY, tmp_path / "fresh")
    assert bad.returncode == 1 and "generation_config.json: size" in bad.stderr and "Traceback" not in bad.stderr
    no_key = run_init(None, tmp_path / "fresh2")
    assert no_key.returncode == 1 and f"{KEY_ENV} is not set here" in no_key.stderr
