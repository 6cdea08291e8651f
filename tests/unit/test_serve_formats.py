"""`serve` by format: which merged folder each backend serves (merged-mxfp4/ when published, else merged/), the TP
it is sized for, what a merge renders when nothing is published, and every other reader of a merged folder."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from gptoss_cloud.backends.serving import resolve_target
from gptoss_cloud.backends.truss import serve_config as render_truss
from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.contract.merged import MERGED_MARKER, merge_format_for, published_key
from gptoss_cloud.contract.spec import RunSpec
from gptoss_cloud.contract.store.objects import open_store
from gptoss_cloud.main import app
from gptoss_cloud.render.k8s import serve as rs
from test_serve_render import RUN, by_kind, make_run, target, validate_k8s

MXFP4_CONFIG = {"model_type": "gpt_oss", "quantization_config": {"quant_method": "mxfp4"}}


def publish(home, key: str, config: dict | None = None) -> None:
    (home / key).mkdir()
    (home / key / "config.json").write_text(json.dumps(config or {}))
    (home / key / MERGED_MARKER).write_text("{}")


def arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


# ------------------------------------------------------------------------------------ which folder
def test_k8s_serves_merged_mxfp4_when_published_on_one_80gb_gpu(tmp_path):
    home = make_run(tmp_path)
    publish(home, "merged-mxfp4", MXFP4_CONFIG)
    t, notes = resolve_target(RUN, str(tmp_path), {}, environ={})
    assert (t.fmt, t.tp, t.needs_merge, t.merged_key) == ("mxfp4", 1, False, "merged-mxfp4")
    assert any("TP=1 mxfp4" in n and "holds 4 full-length" in n for n in notes)
    k = by_kind(rs.serve_objects(t))
    assert "Job" not in k
    dep = k["Deployment"]
    validate_k8s(dep)
    pod = dep["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"][3:5] == [f"{home}/merged-mxfp4", "/models/merged"] and MERGED_MARKER in init["command"]
    args = pod["containers"][0]["args"]
    assert arg(args, "--model") == "/models/merged" and arg(args, "--tensor-parallel-size") == "1"
    # vLLM reads the quantization from config.json (quantization_config.quant_method: mxfp4, mapped to
    # gpt_oss_mxfp4 by GptOssForCausalLMConfig.verify_and_update_model_config, models/config.py): no flag needed.
    assert "--quantization" not in args and "--dtype" not in args
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert dep["metadata"]["annotations"]["gptoss-cloud.dev/serving"] == "merged-mxfp4"
    models = next(v for v in pod["volumes"] if v["name"] == "models")
    assert models["emptyDir"]["sizeLimit"] == "69Gi"   # 60.8 GiB of weights + 8


def test_auto_prefers_mxfp4_and_the_flag_picks_bf16(tmp_path):
    home = make_run(tmp_path)
    publish(home, "merged")
    assert (target(tmp_path).fmt, target(tmp_path).tp) == ("bf16", 4)   # only bf16 published: bf16, TP 4
    publish(home, "merged-mxfp4", MXFP4_CONFIG)
    assert (target(tmp_path).fmt, target(tmp_path).tp) == ("mxfp4", 1)
    t = target(tmp_path, serve__format="bf16")
    assert (t.fmt, t.tp, t.needs_merge, t.merged_key) == ("bf16", 4, False, "merged")
    r = CliRunner().invoke(app, ["serve", RUN, "--store", str(tmp_path), "--backend", "local", "--dry-run",
                                 "--vllm-python", "/venv/bin/python", "--format", "bf16"])
    assert r.exit_code == 0, r.output
    argv = r.stdout.splitlines()[0].split()
    assert arg(argv, "--model") == str(home / "merged") and arg(argv, "--tensor-parallel-size") == "4"


def test_local_serves_the_mxfp4_folder(tmp_path):
    home = make_run(tmp_path)
    publish(home, "merged-mxfp4", MXFP4_CONFIG)
    r = CliRunner().invoke(app, ["serve", RUN, "--store", str(tmp_path), "--backend", "local", "--dry-run",
                                 "--vllm-python", "/venv/bin/python"])
    assert r.exit_code == 0, r.output
    assert arg(r.stdout.splitlines()[0].split(), "--model") == str(home / "merged-mxfp4")


def test_truss_mounts_the_folder_it_serves(tmp_path):
    home = make_run(tmp_path)
    publish(home, "merged-mxfp4", MXFP4_CONFIG)
    cfg = render_truss(replace(target(tmp_path, cluster__backend="truss"), home=f"s3://bucket/runs/{RUN}"))
    assert [w["source"] for w in cfg["weights"]] == [f"s3://bucket/runs/{RUN}/merged-mxfp4"]
    assert [w["mount_location"] for w in cfg["weights"]] == ["/models/merged"]
    assert cfg["resources"]["accelerator"] == "H100:1" and "--tensor-parallel-size 1" in cfg["docker_server"]["start_command"]
    with pytest.raises(GptossError, match="merged/ is not published"):   # bf16 asked for, only MXFP4 published
        render_truss(replace(target(tmp_path, cluster__backend="truss", serve__format="bf16"), home=f"s3://bucket/runs/{RUN}"))
    publish(home, "merged")
    cfg = render_truss(replace(target(tmp_path, cluster__backend="truss", serve__format="bf16"), home=f"s3://bucket/runs/{RUN}"))
    assert cfg["resources"]["accelerator"] == "H100:4" and cfg["weights"][0]["source"].endswith(f"{RUN}/merged")


def test_a_published_step_merge_in_mxfp4_is_served(tmp_path):
    home = make_run(tmp_path, steps=(100,))
    publish(home, "merged-step-100-mxfp4", MXFP4_CONFIG)
    t = target(tmp_path, serve__checkpoint="100")
    assert (t.merged_key, t.needs_merge, t.tp) == ("merged-step-100-mxfp4", False, 1)


# ----------------------------------------------------------------- nothing published: what the merge writes
@pytest.mark.parametrize("tree,fmt", [
    ({}, "mxfp4"),                                                           # frozen MXFP4 experts: lossless
    ({"method": {"kind": "lora", "lora": {"experts": True}}}, "bf16"),       # trained experts without QAT
    ({"method": {"kind": "lora", "qat": "mxfp4", "lora": {"experts": True}}}, "mxfp4"),
    ({"output": {"merge_format": "both"}}, "mxfp4"),                         # both written: MXFP4 served
    ({"model": {"name": "120b", "init": "random"}}, "bf16"),                 # a random base holds bf16 experts
    ({"serve": {"format": "bf16"}}, "bf16"),                                 # asked for
])
def test_the_merge_job_writes_the_runs_resolved_format(tmp_path, tree, fmt):
    make_run(tmp_path, steps=(100,), **tree)
    t = target(tmp_path, serve__checkpoint="100")
    assert t.needs_merge and t.fmt == fmt
    cmd = rs.merge_job(t)["spec"]["template"]["spec"]["containers"][0]["command"]
    key = "merged-step-100" + ("-mxfp4" if fmt == "mxfp4" else "")
    assert cmd[3:] == ["--out", f"{tmp_path / RUN}/{key}", "--format", fmt]
    assert t.tp == (1 if fmt == "mxfp4" else 4)


def test_a_random_base_with_its_own_config_decides_by_it():
    spec = RunSpec.model_validate({"model": {"name": "120b"}})
    assert merge_format_for(spec) == "mxfp4" and merge_format_for(spec, {"model_type": "gpt_oss"}) == "bf16"
    assert merge_format_for(spec, MXFP4_CONFIG) == "mxfp4"


def test_a_default_kv_that_does_not_fit_is_a_clear_error_naming_the_field(tmp_path):
    make_run(tmp_path, cluster={"gpu_type": "L4", "gpu_memory_gib": 14}, serve={"max_model_len": 65536})
    with pytest.raises(GptossError) as e:
        target(tmp_path)
    assert "KV for 2 full-length sequences" in e.value.message and "serve.kv_sequences to 1" in e.value.hint
    assert target(tmp_path, serve__kv_sequences=1).tp == 8


def test_the_serving_cards_memory_sizes_the_server(tmp_path):
    make_run(tmp_path, output={"merge_format": "bf16"})
    assert target(tmp_path).tp == 4
    assert target(tmp_path, cluster__gpu_type="H200", cluster__gpu_memory_gib=141).tp == 2   # a bf16 120b on H200s


# ----------------------------------------------------------------------------------- the other readers
def test_published_key_needs_the_marker_and_prefers_mxfp4(tmp_path):
    st = open_store(str(tmp_path))
    (tmp_path / "merged-mxfp4").mkdir()
    (tmp_path / "merged-mxfp4" / "config.json").write_text("{}")   # shards still being written: not published
    assert published_key(st) is None
    publish(tmp_path, "merged")
    assert published_key(st) == "merged"
    (tmp_path / "merged-mxfp4" / MERGED_MARKER).write_text("{}")
    assert published_key(st) == "merged-mxfp4" and published_key(st, fmt="bf16") == "merged"
    assert published_key(st, step=5) is None


def test_serve_fetch_of_a_promoted_run_fetches_the_format_it_was_sized_for(tmp_path, capsys):
    from gptoss_cloud.contract import promoted as pr
    from gptoss_cloud.trainer.programs import serve_fetch
    from test_promotion import record

    rid = "bot-20261201-030000-aaaa"
    (tmp_path / rid).mkdir()
    publish(tmp_path / rid, "merged-mxfp4", MXFP4_CONFIG)
    pr.write_decision(str(tmp_path), record(rid))
    assert serve_fetch.promoted_source(str(tmp_path), "bot", log=lambda m: None) == f"{tmp_path}/{rid}/merged-mxfp4"
    assert serve_fetch.main([str(tmp_path), str(tmp_path / "out"), "--promoted", "bot", "--format", "mxfp4"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == MXFP4_CONFIG
    assert serve_fetch.main([str(tmp_path), str(tmp_path / "out2"), "--promoted", "bot", "--format", "bf16"]) == 1
    err = capsys.readouterr().err
    assert "no published merged/ folder" in err and "sized for bf16" in err


def test_promotion_accepts_the_mxfp4_folder(tmp_path):
    from gptoss_cloud.promotion import promote_run
    from test_promotion import make_home

    home = make_home(tmp_path, "bot-20261201-030000-aaaa", loss=1.0, merged=False)
    assert "no published merged folder" in promote_run("bot-20261201-030000-aaaa", str(home)).record.reason
    publish(home, "merged-mxfp4", MXFP4_CONFIG)
    assert promote_run("bot-20261201-030000-aaaa", str(home)).record.decision == "promoted"


def test_push_names_both_folders_when_neither_is_published(tmp_path, monkeypatch):
    make_run(tmp_path)
    monkeypatch.setenv("HF_TOKEN", "x")
    r = CliRunner().invoke(app, ["push", RUN, "--to", "hf://org/name", "--store", str(tmp_path)])
    assert r.exit_code != 0 and "merged-mxfp4/ or merged/" in str(r.exception)
    r = CliRunner().invoke(app, ["push", RUN, "--to", "hf://org/name", "--store", str(tmp_path), "--format", "nvfp4"])
    assert r.exit_code != 0 and "--format 'nvfp4'" in str(r.exception)
