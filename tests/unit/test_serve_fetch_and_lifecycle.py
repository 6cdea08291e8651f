"""The vLLM pod's init program (real store folder) and `delete` / `push` argument and error paths."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from gptoss_cloud.trainer.programs import serve_fetch
from gptoss_cloud.commands.lifecycle import parse_hf_target
from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.main import app
from test_serve_render import RUN, make_run


def test_fetch_copies_the_folder_waits_for_the_marker_and_resumes(tmp_path, shared):
    src = tmp_path / "store" / "merged"
    (src / "sub").mkdir(parents=True)
    (src / "model-00001.safetensors").write_bytes(b"x" * 1000)
    (src / "sub" / "tokenizer.json").write_text("{}")
    with pytest.raises(GptossError, match="did not appear"):
        serve_fetch.wait_for(str(src), "model.safetensors.index.json", timeout_s=0.2, poll_s=0.05, log=lambda m: None)
    (src / "model.safetensors.index.json").write_text("{}")
    serve_fetch.wait_for(str(src), "model.safetensors.index.json", timeout_s=1, poll_s=0.05, log=lambda m: None)

    dest = tmp_path / "models"
    assert serve_fetch.fetch(str(src), dest, log=lambda m: None) == 3
    assert (dest / "sub" / "tokenizer.json").read_text() == "{}"
    assert serve_fetch.fetch(str(src), dest, log=lambda m: None) == 0   # a restarted pod keeps complete files
    (dest / "model-00001.safetensors").write_bytes(b"x" * 10)            # a partial file is fetched again
    assert serve_fetch.fetch(str(src), dest, log=lambda m: None) == 1


def test_main_copies_the_vocabulary_and_reports_errors(tmp_path, shared, monkeypatch, capsys):
    src = tmp_path / "adapter"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(shared / "tokenizers"))
    assert serve_fetch.main([str(src), str(tmp_path / "out"), "--wait-for", "adapter_config.json", "--vocab-to", str(tmp_path / "tk")]) == 0
    assert (tmp_path / "tk" / serve_fetch.VOCAB_FILE).stat().st_size == (shared / "tokenizers" / serve_fetch.VOCAB_FILE).stat().st_size
    assert serve_fetch.main([str(tmp_path / "empty"), str(tmp_path / "out2")]) == 1
    assert "nothing to serve" in capsys.readouterr().err


@pytest.mark.parametrize("uri", ["hf://org", "org/name", "s3://org/name", "hf://org/name/extra", "hf:///name"])
def test_push_target_must_be_hf_org_name(uri):
    with pytest.raises(GptossError, match="hf://ORG/NAME"):
        parse_hf_target(uri)


def test_push_target_ok():
    assert parse_hf_target("hf://my-org/gpt-oss-20b-ft") == "my-org/gpt-oss-20b-ft"


def test_push_needs_a_token_and_a_merged_folder(tmp_path, monkeypatch):
    make_run(tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    r = CliRunner().invoke(app, ["push", RUN, "--to", "hf://org/name", "--store", str(tmp_path)])
    assert r.exit_code != 0 and "HF_TOKEN" in str(r.exception)
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    r = CliRunner().invoke(app, ["push", RUN, "--to", "hf://org/name", "--store", str(tmp_path)])
    assert r.exit_code != 0 and "nothing to push" in str(r.exception) and "gptoss-cloud merge" in str(r.exception)


def test_delete_asks_first_and_removes_the_store_home(tmp_path):
    home = make_run(tmp_path, merged=True, cluster={"backend": "local"})
    r = CliRunner().invoke(app, ["delete", RUN, "--store", str(tmp_path)], input="n\n")
    assert r.exit_code == 1 and home.exists()
    r = CliRunner().invoke(app, ["delete", RUN, "--store", str(tmp_path)], input="y\n")
    assert r.exit_code == 0, r.output
    assert not home.exists() and "3 file(s)" in r.output


def test_delete_on_k8s_without_a_cluster_is_one_clear_error_and_keeps_the_store(tmp_path, monkeypatch):
    home = make_run(tmp_path)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    r = CliRunner().invoke(app, ["delete", RUN, "--store", str(tmp_path), "--yes"])
    assert r.exit_code != 0 and "Kubernetes configuration" in str(r.exception)
    assert home.exists()
    r = CliRunner().invoke(app, ["delete", RUN, "--store", str(tmp_path), "--yes", "--keep-cluster"])
    assert r.exit_code == 0 and not home.exists()
