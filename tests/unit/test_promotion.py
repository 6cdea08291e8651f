"""Gated promotion without training: dataset templates, the gate's arithmetic, records written whole
and read as untrusted, `promote` decisions on run homes in a real store folder, the CronJob that
ticks, and serving that follows the record."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gptoss_cloud.contract import promoted as pr
from gptoss_cloud.contract import templates
from gptoss_cloud.contract.errors import GptossError, SpecError
from gptoss_cloud.contract.spec import PromoteSection, RunSpec, load_spec
from gptoss_cloud.main import app
from gptoss_cloud.promotion import promote_run
from gptoss_cloud.render.k8s import gitops
from gptoss_cloud.trainer.programs import serve_fetch
from test_serve_render import assert_restricted, validate_k8s

AT = datetime(2026, 12, 2, 3, 0, 5, tzinfo=timezone.utc)
HELD = "s3://bucket/held.jsonl"
GATE = {"name": "bot", "eval_data": HELD, "max_eval_loss_regression": 0.05, "min_format_valid_rate": 0.5}


# ------------------------------------------------------------------------------------- templates
def test_dataset_templates_expand_from_the_run_start_time():
    spec = RunSpec.model_validate({"name": "daily", "data": {
        "datasets": [{"path": "s3://b/data/{date}/"}, {"path": "s3://b/{name}/{yesterday}T{hour}.jsonl"}, {"path": "sample"}],
        "validation": {"path": "s3://b/val/{tick}.jsonl"}}})
    out = templates.expand_for_run(spec, "daily-20261202-030005-beef")
    assert [d.path for d in out.data.datasets] == ["s3://b/data/2026-12-02/", "s3://b/daily/2026-12-01T03.jsonl", "sample"]
    assert out.data.validation.path == "s3://b/val/20261202-030005.jsonl"
    assert templates.spec_templates(out) == [] and templates.spec_templates(spec) == [
        "data.datasets[0].path", "data.datasets[1].path", "data.validation.path"]
    plain = RunSpec.model_validate({"data": {"datasets": [{"path": "x.jsonl"}]}})
    assert templates.expand_for_run(plain, "not-a-generated-id") is plain   # nothing to expand, no time needed
    assert templates.expand("{date}", datetime(2026, 1, 1, 0, 30, tzinfo=timezone.utc), "n", "f") == "2026-01-01"


@pytest.mark.parametrize("path,why", [
    ("s3://b/{day}/", "data.datasets.0.path: unknown placeholder {day} in 's3://b/{day}/'; known: {date}"),
    ("s3://b/{date/", "data.datasets.0.path: unpaired '{'"),
    ("s3://b/date}/", "unpaired '}'"),
    ("s3://b/{}/", "unknown placeholder {}"),
])
def test_unknown_placeholders_fail_at_load_naming_the_field(tmp_path, path, why):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"data": {"datasets": [{"path": path}]}}))
    with pytest.raises(SpecError) as e:
        load_spec(f, environ={}, user_config=tmp_path / "none")
    assert why in e.value.message


def test_submit_records_the_expanded_paths_in_the_spec_it_renders(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"name": "daily", "model": {"name": "20b"}, "output": {"store": "s3://bucket/runs"},
                                 "data": {"datasets": [{"path": "s3://b/data/{date}/"}]},
                                 "cluster": {"backend": "k8s", "namespace": "train"}}))
    r = CliRunner().invoke(app, ["submit", str(f), "--dry-run", "-o", "json"])
    assert r.exit_code == 0, r.output
    (cm,) = [o for o in json.loads(r.stdout)["items"] if o["kind"] == "ConfigMap"]
    stored = yaml.safe_load(cm["data"]["spec.yaml"])
    run_id = cm["metadata"]["labels"]["gptoss-cloud.dev/run-id"]
    assert stored["data"]["datasets"][0]["path"] == f"s3://b/data/{templates.run_time(run_id):%Y-%m-%d}/"


# ------------------------------------------------------------------------------------------- spec
@pytest.mark.parametrize("section,why", [
    ({"eval_data": HELD}, "promote.name: Field required"),
    ({"name": "Bot!", "eval_data": HELD}, "promote.name must be 1-40 lowercase"),
    ({"name": "bot", "eval_data": "s3://b/held/{date}.jsonl"}, "promote.eval_data must be one fixed held-out file"),
    ({"name": "bot", "eval_data": HELD, "min_format_valid_rate": 1.5}, "promote.min_format_valid_rate"),
    ({"name": "bot", "eval_data": HELD, "max_eval_loss_regression": -1}, "promote.max_eval_loss_regression"),
    ({"name": "bot", "eval_data": HELD, "gate": 1}, "promote.gate: unknown key"),
])
def test_promote_section_is_validated_with_clear_errors(tmp_path, section, why):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"promote": section}))
    with pytest.raises(SpecError) as e:
        load_spec(f, environ={}, user_config=tmp_path / "none")
    assert why in e.value.message


def test_promote_is_off_by_default():
    assert RunSpec().promote is None and RunSpec.model_validate(yaml.safe_load(RunSpec().to_yaml())).promote is None


# ------------------------------------------------------------------------------------------- gate
def ev(loss: float, rate: float | None = 1.0, tokens: int = 100, data: str = HELD) -> pr.EvalNumbers:
    return pr.EvalNumbers(data=data, step=10, loss=loss, tokens=tokens, format_valid_rate=rate)


@pytest.mark.parametrize("gate,cand,cur,ok,text", [
    ({}, ev(9.0), None, True, "no run promoted yet"),
    ({"max_eval_loss": 2.0}, ev(2.5), None, False, "eval loss 2.5000 > max_eval_loss 2.0000"),
    ({"min_format_valid_rate": 0.9}, ev(1.0, 0.5), None, False, "format valid 50% < min_format_valid_rate 90%"),
    ({"min_format_valid_rate": 0.5}, ev(1.0, None), None, False, "format valid n/a"),
    ({"min_eval_tokens": 200}, ev(1.0), None, False, "fewer than min_eval_tokens 200"),
    ({}, ev(1.0), ev(1.0), True, "(+0.0000; within max_eval_loss_regression 0)"),
    ({}, ev(1.0001), ev(1.0), False, "eval loss 1.0001 vs promoted 1.0000 (+0.0001; beyond"),
    ({"max_eval_loss_regression": 0.1}, ev(1.1), ev(1.0), True, "within max_eval_loss_regression 0.1"),
    ({"max_eval_loss_regression": 0.1}, ev(1.2), ev(1.0), False, "beyond max_eval_loss_regression 0.1"),
    ({}, ev(0.5), ev(1.0, data="other.jsonl"), False, "evaluated on 'other.jsonl', this run on"),
    ({"min_format_valid_rate": 0.9}, ev(0.5, 0.5), ev(1.0), False, "format valid 50% < "),   # better loss, broken format
])
def test_gate_arithmetic(gate, cand, cur, ok, text):
    v = pr.judge(PromoteSection(name="bot", eval_data=HELD, **gate), cand, cur)
    assert v.ok is ok and text in v.reason, v.reason


# ---------------------------------------------------------------------------------------- records
def record(run_id: str, decision: str = "promoted", loss: float = 1.0, **kw) -> pr.Record:
    return pr.Record(name="bot", run_id=run_id, time=kw.pop("time", pr.now_stamp()), decision=decision,
                     reason="because", eval=ev(loss), **kw)


def test_records_round_trip_and_history_keeps_every_decision_in_order(tmp_path):
    store = str(tmp_path)
    assert pr.read_record(store, "bot") is None
    pr.write_decision(store, record("bot-20261201-030000-aaaa", time="2026-12-01T03:10:00.000000Z"))
    pr.write_decision(store, record("bot-20261202-030000-bbbb", "refused", time="2026-12-02T03:10:00.000000Z"))
    cur = pr.read_record(store, "bot")
    assert cur.run_id == "bot-20261201-030000-aaaa" and cur.eval == ev(1.0)   # a refusal leaves the record alone
    hist, bad = pr.read_history(store, "bot")
    assert [(h.run_id, h.decision) for h in hist] == [("bot-20261201-030000-aaaa", "promoted"), ("bot-20261202-030000-bbbb", "refused")]
    assert bad == []


def test_a_crash_while_writing_the_record_leaves_the_old_one_whole(tmp_path, monkeypatch):
    store = str(tmp_path)
    pr.write_decision(store, record("bot-20261201-030000-aaaa"))
    before = (tmp_path / "promoted" / "bot.json").read_bytes()
    real = os.replace

    def crash(src, dst):
        if str(dst).endswith("promoted/bot.json"):
            raise OSError("power lost")   # the new bytes sit in a temporary file, never under the name
        return real(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        pr.write_decision(store, record("bot-20261202-030000-bbbb", loss=0.5))
    monkeypatch.undo()
    assert (tmp_path / "promoted" / "bot.json").read_bytes() == before
    assert pr.read_record(store, "bot").run_id == "bot-20261201-030000-aaaa"
    # the decision was written first: the history explains what was attempted
    assert [h.run_id for h in pr.read_history(store, "bot")[0]] == ["bot-20261201-030000-aaaa", "bot-20261202-030000-bbbb"]


GOOD = record("bot-20261201-030000-aaaa").to_json()


@pytest.mark.parametrize("body,why", [
    (b"x" * (pr.MAX_RECORD_BYTES + 1), "more than 65536 bytes"),
    (b"{not json", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (json.dumps({**GOOD, "format": 9}).encode(), "format 9, expected 1"),
    (json.dumps({**GOOD, "name": "other"}).encode(), "record names 'other', not 'bot'"),
    (json.dumps({**GOOD, "run_id": "../../etc"}).encode(), "invalid run id"),
    (json.dumps({**GOOD, "run_id": "bot"}).encode(), "is not a run id"),
    (json.dumps({**GOOD, "decision": "maybe"}).encode(), "neither promoted nor refused"),
    (json.dumps({**GOOD, "decision": "refused"}).encode(), "the current record says 'refused'"),
    (json.dumps({**GOOD, "eval": {**GOOD["eval"], "loss": float("nan")}}).encode(), "eval.loss is not a finite"),
    (json.dumps({**GOOD, "eval": {**GOOD["eval"], "tokens": True}}).encode(), "eval.tokens is not a whole number"),
    (json.dumps({**GOOD, "previous": "/abs"}).encode(), "invalid run id"),
])
def test_bad_records_are_refused_naming_the_key(tmp_path, body, why):
    (tmp_path / "promoted").mkdir()
    (tmp_path / "promoted" / "bot.json").write_bytes(body)
    with pytest.raises(pr.PromotionError) as e:
        pr.read_record(str(tmp_path), "bot")
    assert why in e.value.message and str(tmp_path / "promoted" / "bot.json") in e.value.message


@pytest.mark.parametrize("name", ["../x", "a/b", "", "X", "-a"])
def test_names_that_would_escape_the_promoted_folder_are_refused(tmp_path, name):
    with pytest.raises(pr.PromotionError, match="invalid promotion name"):
        pr.read_record(str(tmp_path), name)


# --------------------------------------------------------------------------------------- promote
def make_home(store: Path, run_id: str, *, loss: float | None, rate: float = 1.0, state: str = "succeeded",
              merged: bool = True, data: str = HELD, gate: dict | None = None) -> Path:
    home = store / run_id
    home.mkdir(parents=True)
    spec = {"name": "bot", "output": {"store": str(store)}, "promote": gate or GATE}
    (home / "spec.yaml").write_text(RunSpec.model_validate(spec).to_yaml())
    (home / "summary.json").write_text(json.dumps({"state": state, "steps": 10}))
    if merged:
        (home / "merged").mkdir()
        (home / "merged" / "model.safetensors.index.json").write_text("{}")
    if loss is not None:
        (home / "evals").mkdir()
        (home / "evals" / "20261202-031000-step-10.json").write_text(json.dumps(
            {"data": data, "step": 10, "loss": loss, "tokens": 50, "generation": {"format_valid_rate": rate}}))
    return home


def decide(store: Path, run_id: str, **kw):
    return promote_run(run_id, str(store / run_id), **kw).record


def test_promote_first_run_then_refuses_a_worse_one_and_takes_a_better_one(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")   # one table row per line
    make_home(tmp_path, "bot-20261201-030000-aaaa", loss=1.0)
    make_home(tmp_path, "bot-20261202-030000-bbbb", loss=1.2)
    make_home(tmp_path, "bot-20261203-030000-cccc", loss=0.9)
    first = decide(tmp_path, "bot-20261201-030000-aaaa")
    assert first.decision == "promoted" and "no run promoted yet" in first.reason and first.previous is None
    worse = decide(tmp_path, "bot-20261202-030000-bbbb")
    assert worse.decision == "refused" and "eval loss 1.2000 vs promoted 1.0000 (+0.2000; beyond" in worse.reason
    assert worse.previous == "bot-20261201-030000-aaaa"
    better = decide(tmp_path, "bot-20261203-030000-cccc")
    assert better.decision == "promoted" and better.previous == "bot-20261201-030000-aaaa"
    assert pr.read_record(str(tmp_path), "bot").run_id == "bot-20261203-030000-cccc"
    again = decide(tmp_path, "bot-20261203-030000-cccc")
    assert again.decision == "refused" and again.reason == "already the promoted run"

    r = CliRunner().invoke(app, ["runs", "--store", str(tmp_path)])
    assert r.exit_code == 0, r.output
    lines = {line.split()[0]: line for line in r.stdout.splitlines() if line.startswith("bot-")}
    assert "PROMOTED as bot" in lines["bot-20261203-030000-cccc"]
    assert "refused for bot: eval loss 1.2000 vs promoted 1.0000" in lines["bot-20261202-030000-bbbb"]
    assert "was promoted as bot, since replaced" in lines["bot-20261201-030000-aaaa"]
    rows = {row["run_id"]: row for row in json.loads(CliRunner().invoke(app, ["runs", "--store", str(tmp_path), "-o", "json"]).stdout)}
    assert rows["bot-20261203-030000-cccc"]["promotion"]["current"] is True


def test_promote_refuses_what_cannot_be_served_even_when_forced(tmp_path):
    make_home(tmp_path, "bot-20261201-030000-aaaa", loss=1.0, state="failed")
    make_home(tmp_path, "bot-20261202-030000-bbbb", loss=1.0, merged=False)
    assert "the run did not succeed (state Failed)" in decide(tmp_path, "bot-20261201-030000-aaaa", force=True).reason
    assert "no published merged folder" in decide(tmp_path, "bot-20261202-030000-bbbb", force=True).reason
    assert pr.read_record(str(tmp_path), "bot") is None


def test_promote_needs_an_evaluation_on_the_gate_data_unless_forced(tmp_path):
    make_home(tmp_path, "bot-20261201-030000-aaaa", loss=None)
    make_home(tmp_path, "bot-20261202-030000-bbbb", loss=0.5, data="elsewhere.jsonl")   # evaluated, but not on the gate's data
    r = decide(tmp_path, "bot-20261201-030000-aaaa")
    assert r.decision == "refused" and f"gptoss-cloud eval bot-20261201-030000-aaaa --data {HELD}" in r.reason
    assert decide(tmp_path, "bot-20261202-030000-bbbb").decision == "refused"
    forced = decide(tmp_path, "bot-20261201-030000-aaaa", force=True)
    assert forced.decision == "promoted" and forced.forced and "forced without an evaluation" in forced.reason


def test_a_diverged_evaluation_is_refused_not_a_crash(tmp_path):
    home = make_home(tmp_path, "bot-20261201-030000-aaaa", loss=1.0)
    (home / "evals" / "20261202-031000-step-10.json").write_text('{"data": "%s", "step": 10, "loss": NaN, "tokens": 5}' % HELD)
    r = decide(tmp_path, "bot-20261201-030000-aaaa", force=True)
    assert r.decision == "refused" and "the evaluation is unusable" in r.reason and "eval.loss is not a finite" in r.reason


def test_promote_command_force_rolls_back_past_the_gate_and_exit_codes_say_which(tmp_path):
    make_home(tmp_path, "bot-20261201-030000-aaaa", loss=1.0)
    make_home(tmp_path, "bot-20261202-030000-bbbb", loss=0.8)
    run = CliRunner().invoke
    assert run(app, ["promote", "bot-20261201-030000-aaaa", "--store", str(tmp_path)]).exit_code == 0
    assert run(app, ["promote", "bot-20261202-030000-bbbb", "--store", str(tmp_path)]).exit_code == 0
    r = run(app, ["promote", "bot-20261201-030000-aaaa", "--store", str(tmp_path)])
    assert r.exit_code == 3 and "REFUSED as bot" in r.stdout and "beyond max_eval_loss_regression" in r.stdout
    r = run(app, ["promote", "bot-20261201-030000-aaaa", "--store", str(tmp_path), "--force", "-o", "json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["forced"] and out["previous"] == "bot-20261202-030000-bbbb" and out["reason"].startswith("forced past the gate")


def test_an_unusable_current_record_blocks_promotion_until_forced(tmp_path):
    make_home(tmp_path, "bot-20261201-030000-aaaa", loss=1.0)
    (tmp_path / "promoted").mkdir()
    (tmp_path / "promoted" / "bot.json").write_text("{torn")
    r = decide(tmp_path, "bot-20261201-030000-aaaa")
    assert r.decision == "refused" and "the current record is unusable" in r.reason
    assert decide(tmp_path, "bot-20261201-030000-aaaa", force=True).decision == "promoted"
    assert pr.read_record(str(tmp_path), "bot").run_id == "bot-20261201-030000-aaaa"


def test_runs_reports_a_bad_history_entry_and_still_lists_the_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    make_home(tmp_path, "bot-20261201-030000-aaaa", loss=1.0)
    decide(tmp_path, "bot-20261201-030000-aaaa")
    (tmp_path / "promoted" / "bot.history" / "20991231T000000000000Z-evil.json").write_text('{"format": 1}')
    r = CliRunner().invoke(app, ["runs", "--store", str(tmp_path)])
    assert r.exit_code == 0 and "PROMOTED as bot" in r.stdout
    assert "warning:" in r.stderr and "20991231T000000000000Z-evil.json" in r.stderr


# ------------------------------------------------------------------------------- the ticking CronJob
def test_a_promoting_schedule_ticks_and_may_restart_only_its_deployment():
    spec = RunSpec.model_validate({"name": "weekly", "model": {"name": "20b"}, "output": {"store": "s3://bucket/runs"},
                                   "cluster": {"backend": "k8s", "namespace": "train", "store_secret": {"name": "store-creds"}},
                                   "promote": GATE})
    objs = {o["kind"]: o for o in gitops.schedule_objects(spec, "0 3 * * *")}
    for o in objs.values():
        validate_k8s(o)
    extra = objs["Role"]["rules"][2:]
    assert extra == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
                     {"apiGroups": ["apps"], "resources": ["deployments"], "resourceNames": ["vllm-bot"], "verbs": ["patch"]}]
    job = objs["CronJob"]["spec"]["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    assert_restricted(pod)
    c = pod["containers"][0]
    assert c["command"][:5] == ["gptoss-cloud", "tick", "/etc/gptoss/spec.yaml", "--backend", "k8s"]
    assert job["backoffLimit"] == 0 and job["activeDeadlineSeconds"] > 86400   # a retried tick would train twice
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1" and pod["serviceAccountName"].endswith("-submitter")
    no_restart = spec.model_copy(update={"promote": spec.promote.model_copy(update={"restart_deployment": False})})
    assert not any("deployments" in r["resources"] for r in gitops.schedule_objects(no_restart, "0 3 * * *")[2]["rules"])


# ----------------------------------------------------------------------------- serving follows it
def test_serve_promoted_renders_a_deployment_that_reads_the_record_at_start(tmp_path):
    from gptoss_cloud.backends.serving import resolve_promoted
    from gptoss_cloud.render.k8s import serve as rs
    from test_serve_render import make_run

    rid = "demo-20250101-000000-abcd"
    make_run(tmp_path, rid, merged=True)
    with pytest.raises(GptossError, match="nothing promoted as 'bot'"):
        resolve_promoted("bot", str(tmp_path), {}, environ={})
    pr.write_decision(str(tmp_path), record(rid))
    t, notes = resolve_promoted("bot", str(tmp_path), {}, environ={})
    assert any(f"bot is run {rid} now" in n for n in notes)
    dep = {o["kind"]: o for o in rs.serve_objects(t)}["Deployment"]
    validate_k8s(dep)
    assert dep["metadata"]["name"] == "vllm-bot"
    assert dep["metadata"]["annotations"]["gptoss-cloud.dev/promoted"] == f"{tmp_path}/promoted/bot.json"
    pod = dep["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"] == ["python", "-m", "gptoss_cloud.trainer.programs.serve_fetch", str(tmp_path), "/models/merged",
                               "--promoted", "bot", "--format", "bf16"]   # the format TP was sized for
    args = pod["containers"][0]["args"]
    assert args[args.index("--served-model-name") + 1] == "bot"   # clients keep one model name across promotions
    assert rid not in json.dumps(dep)                               # nothing in Git changes when the promotion does


def test_serve_fetch_resolves_the_alias_and_refuses_a_hostile_record(tmp_path, capsys):
    rid = "bot-20261201-030000-aaaa"
    merged = tmp_path / rid / "merged"
    merged.mkdir(parents=True)
    (merged / "config.json").write_text("{}")
    (merged / "model.safetensors.index.json").write_text("{}")   # published: what serve_fetch picks a folder by
    assert serve_fetch.main([str(tmp_path), str(tmp_path / "out"), "--promoted", "bot"]) == 1
    assert "nothing promoted as 'bot'" in capsys.readouterr().err
    pr.write_decision(str(tmp_path), record(rid))
    assert serve_fetch.promoted_source(str(tmp_path), "bot", log=lambda m: None) == f"{tmp_path}/{rid}/merged"
    assert serve_fetch.main([str(tmp_path), str(tmp_path / "out"), "--promoted", "bot"]) == 0
    assert (tmp_path / "out" / "config.json").is_file()
    (tmp_path / "promoted" / "bot.json").write_text(json.dumps({**GOOD, "run_id": "../../secrets"}))
    assert serve_fetch.main([str(tmp_path), str(tmp_path / "out2"), "--promoted", "bot"]) == 1
    assert "invalid run id" in capsys.readouterr().err and not (tmp_path / "out2").exists()
    assert serve_fetch.main([str(tmp_path), str(tmp_path / "out3"), "--promoted", "../bot"]) == 1
    assert "invalid promotion name" in capsys.readouterr().err


def test_a_rendered_single_run_refuses_dataset_templates():
    spec = RunSpec.model_validate({"name": "daily", "model": {"name": "20b"}, "data": {"datasets": [{"path": "s3://b/{date}/"}]},
                                   "cluster": {"backend": "k8s"}})
    with pytest.raises(GptossError, match=r"data.datasets\[0\].path hold dataset templates"):
        gitops.single_run_objects(spec)
    assert gitops.schedule_objects(spec, "@daily")   # a schedule fills them at each tick


# ------------------------------------------------------------------------------------------ tick
def test_a_tick_whose_run_fails_still_records_why(tmp_path):
    from gptoss_cloud.promotion import tick

    spec = RunSpec.model_validate({"name": "bot", "output": {"store": str(tmp_path)}, "promote": GATE})

    def failing(s, run_id, home):
        Path(home).mkdir(parents=True)
        (Path(home) / "spec.yaml").write_text(s.to_yaml())
        raise GptossError(f"run {run_id} failed (exit code 1)")

    d = tick(spec, launch=failing, timeout_s=5, poll_s=0.1, log=lambda m: None)
    assert d.record.decision == "refused" and "the run did not succeed" in d.record.reason
    assert pr.read_history(str(tmp_path), "bot")[0][0].run_id == d.record.run_id and pr.read_record(str(tmp_path), "bot") is None

    def refused(s, run_id, home):   # refused before anything was written: no run, nothing to decide
        raise GptossError("the plan says it cannot fit")

    with pytest.raises(GptossError, match="cannot fit"):
        tick(spec, launch=refused, timeout_s=5, poll_s=0.1, log=lambda m: None)
    assert len(pr.read_history(str(tmp_path), "bot")[0]) == 1
    with pytest.raises(GptossError, match="tick needs a promote: section"):
        tick(spec.model_copy(update={"promote": None}), launch=failing, timeout_s=5, log=lambda m: None)


def test_restart_patches_one_annotation_of_the_promoted_deployment(monkeypatch):
    from kubernetes.client.exceptions import ApiException

    from gptoss_cloud import promotion
    from gptoss_cloud.kube import client

    calls = []

    class Apps:
        def patch_namespaced_deployment(self, name, ns, body, field_manager):
            calls.append((name, ns, body, field_manager))
            if name == "vllm-gone":
                raise ApiException(status=404)

    monkeypatch.setattr(client.Kube, "api", lambda self, cls: Apps() if cls == "AppsV1Api" else None)
    monkeypatch.setattr(client, "connect", lambda ns, ctx=None: client.Kube(api_client=None, namespace=ns, host="https://k8s"))
    spec = RunSpec.model_validate({"cluster": {"backend": "k8s", "namespace": "ml"}, "promote": GATE})
    lines = []
    promotion.restart_deployment(spec, "bot-20261201-030000-aaaa", lines.append)
    assert calls == [("vllm-bot", "ml", {"spec": {"template": {"metadata": {"annotations": {
        promotion.PROMOTED_ANNOTATION: "bot-20261201-030000-aaaa"}}}}}, "gptoss-cloud-tick")]
    gone = spec.model_copy(update={"promote": spec.promote.model_copy(update={"name": "gone"})})
    promotion.restart_deployment(gone, "bot-20261201-030000-aaaa", lines.append)
    assert lines[-1].startswith("no Deployment vllm-gone in ml to restart")


def test_the_docs_table_names_every_promote_key():
    text = (Path(__file__).parents[2] / "docs" / "gitops-promotion.md").read_text()
    for key in PromoteSection.model_fields:
        assert f"| `{key}` |" in text, key
    for p in templates.PLACEHOLDERS:
        assert f"| `{{{p}}}` |" in text, p


def test_serve_command_takes_a_run_or_a_promotion_name(tmp_path):
    from test_serve_render import make_run

    rid = "demo-20250101-000000-abcd"
    make_run(tmp_path, rid, merged=True)
    pr.write_decision(str(tmp_path), record(rid))
    r = CliRunner().invoke(app, ["serve", "--promoted", "bot", "--store", str(tmp_path), "--dry-run", "-o", "json"])
    assert r.exit_code == 0, r.output
    dep = [o for o in json.loads(r.stdout) if o["kind"] == "Deployment"]
    assert [d["metadata"]["name"] for d in dep] == ["vllm-bot"]
    r = CliRunner().invoke(app, ["serve", rid, "--promoted", "bot", "--store", str(tmp_path), "--dry-run"])
    assert r.exit_code == 1 and "give a RUN or --promoted NAME" in r.exception.message
