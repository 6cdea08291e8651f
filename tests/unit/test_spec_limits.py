"""Spec input limits: alias bombs, size, depth, non-UTF-8, folders, bad GPTOSS_* YAML, numeric bounds."""

from __future__ import annotations

import json
import re
import time

import pytest
from typer.testing import CliRunner

from gptoss_cloud.contract import safe_yaml
from gptoss_cloud.contract.errors import SpecError
from gptoss_cloud.main import app
from gptoss_cloud.contract.spec import load_spec, spec_from_yaml_text

# Nine levels of ten aliases: a billion leaves once anything walks it as a tree.
BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)
)


def test_an_alias_bomb_spec_is_refused_at_once_with_a_short_message(tmp_path):
    p = tmp_path / "spec.yaml"
    p.write_text(BOMB)
    t0 = time.monotonic()
    with pytest.raises(SpecError, match=r"expands to more than 100000 values") as e:
        load_spec(p)
    assert time.monotonic() - t0 < 2.0
    assert len(str(e.value)) < 300 and "x, x" not in str(e.value)


def test_a_few_aliases_are_still_fine(tmp_path):
    p = tmp_path / "spec.yaml"
    p.write_text("optim: &o\n  lr: 0.001\ncheckpoint:\n  every_steps: 5\n")
    assert load_spec(p).optim.lr == 0.001


def test_a_bomb_in_one_run_home_does_not_stop_runs_listing_the_others(tmp_path):
    store = tmp_path / "store"
    good = store / "good-20250101-000000-aaaa"
    good.mkdir(parents=True)
    (good / "spec.yaml").write_text(load_spec(overrides={"output.store": str(store)}).to_yaml())
    for rid, body in (("bomb-20250101-000000-bbbb", BOMB.encode()), ("latin-20250101-000000-cccc", b"name: caf\xe9\n")):
        (store / rid).mkdir()
        (store / rid / "spec.yaml").write_bytes(body)
    t0 = time.monotonic()
    r = CliRunner().invoke(app, ["runs", "--store", str(store), "-o", "json"])
    assert r.exit_code == 0, r.output
    assert time.monotonic() - t0 < 10
    rows = {row["run_id"]: row for row in json.loads(r.stdout)}
    assert set(rows) == {"good-20250101-000000-aaaa", "bomb-20250101-000000-bbbb", "latin-20250101-000000-cccc"}
    assert rows["good-20250101-000000-aaaa"]["backend"] == "local" and rows["good-20250101-000000-aaaa"]["model"] == "tiny"
    assert rows["bomb-20250101-000000-bbbb"]["state"] == "Unknown" and "expands to more than" in rows["bomb-20250101-000000-bbbb"]["error"]
    assert "not UTF-8" in rows["latin-20250101-000000-cccc"]["error"]


@pytest.mark.parametrize(
    "body, message",
    [
        ("x" * (safe_yaml.MAX_BYTES + 10), "more than a spec may hold"),
        ("a: " + "[" * 200 + "]" * 200 + "\n", "nested"),
        ("a: &a [*a]\n", "nested deeper"),
        ("a: 1\n---\nb: 2\n", "not valid YAML"),
    ],
)
def test_oversized_deep_recursive_or_multi_document_yaml_is_one_error(tmp_path, body, message):
    p = tmp_path / "spec.yaml"
    p.write_text(body)
    with pytest.raises(SpecError, match=message) as e:
        load_spec(p)
    assert len(str(e.value)) < 400


def test_a_spec_file_that_is_not_utf8_or_is_a_folder_is_one_error(tmp_path):
    p = tmp_path / "spec.yaml"
    p.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(SpecError, match=r"spec\.yaml: not UTF-8 text \(byte 9"):
        load_spec(p)
    (tmp_path / "d").mkdir()
    with pytest.raises(SpecError, match=r"spec file .*/d is a folder"):
        load_spec(tmp_path / "d")


def test_a_gptoss_value_that_is_not_yaml_names_the_variable():
    with pytest.raises(SpecError, match=r"environment variable GPTOSS_OPTIM__LR:1:\d+: not valid YAML"):
        load_spec(environ={"GPTOSS_OPTIM__LR": "[1e-4"})


@pytest.mark.parametrize(
    "yaml_text, field",
    [
        ("optim: {lr: .inf}", "optim.lr"),
        ("optim: {lr: .nan}", "optim.lr"),
        ("optim: {lr: 3}", "optim.lr"),
        ("optim: {betas: [5, -3]}", "optim.betas.0"),
        ("optim: {betas: [0.9, 1.0]}", "optim.betas.1"),
        ("optim: {eps: -1}", "optim.eps"),
        ("optim: {max_steps: 1.0e+12}", "optim.max_steps"),
        ("optim: {seed: -1}", "optim.seed"),
        ("data: {max_seq_len: 1.0e+12}", "data.max_seq_len"),
        ("data: {max_seq_len: 4194304}", "data.max_seq_len"),
        ("data: {datasets: [{path: a.jsonl, weight: .inf}]}", "data.datasets.0.weight"),
        ("cluster: {gpu_memory_gib: .inf}", "cluster.gpu_memory_gib"),
        ("cluster: {host_memory_gib: -5}", "cluster.host_memory_gib"),
        ("cluster: {local_disk_gib: 0}", "cluster.local_disk_gib"),
        ("cluster: {ttl_seconds_after_finished: -1}", "cluster.ttl_seconds_after_finished"),
        ("parallelism: {collective_timeout_s: .inf}", "parallelism.collective_timeout_s"),
        ("method: {lora: {r: 100000}}", "method.lora.r"),
        ("method: {lora: {expert_layers: [-1]}}", "method.lora.expert_layers.0"),
        ("serve: {max_model_len: 1.0e+12}", "serve.max_model_len"),
    ],
)
def test_numbers_must_be_finite_and_in_range(tmp_path, yaml_text, field):
    p = tmp_path / "spec.yaml"
    p.write_text(yaml_text + "\n")
    with pytest.raises(SpecError, match="(?m)^  " + re.escape(field) + ": "):
        load_spec(p)


def test_error_messages_quote_only_a_prefix_of_the_input():
    with pytest.raises(SpecError) as e:
        spec_from_yaml_text("cluster:\n  backend: " + "k" * 5000 + "\n", "home/spec.yaml")
    assert "got 'kkkk" in str(e.value) and len(str(e.value)) < 400


def test_thousands_of_bad_keys_report_the_first_twenty_and_a_count(tmp_path):
    p = tmp_path / "spec.yaml"
    p.write_text("optim:\n" + "".join(f"  bad_key_{i}: 1\n" for i in range(5000)) + "k" * 200 + "_long: 1\n")
    with pytest.raises(SpecError) as e:
        load_spec(p)
    lines = str(e.value).splitlines()
    assert len(lines) == 22 and lines[-1] == "  ... and 4981 more"
    assert all(len(ln) < 200 for ln in lines)


def test_a_folder_in_the_store_that_is_not_a_run_id_is_listed_unread_and_printed_safely(tmp_path):
    store = tmp_path / "store"
    odd = store / "Evil [red]\x1b[31mname"
    odd.mkdir(parents=True)
    (odd / "spec.yaml").write_text(BOMB)
    r = CliRunner().invoke(app, ["runs", "--store", str(store), "-o", "json"])
    assert r.exit_code == 0, r.output
    [row] = json.loads(r.stdout)
    assert row["error"] == "not a run id: its folder was not read" and "\x1b" not in row["run_id"]
    r = CliRunner().invoke(app, ["runs", "--store", str(store)])
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.stdout and "[red]" in r.stdout
