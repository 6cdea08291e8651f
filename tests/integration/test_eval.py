"""`eval` on a real trained run: the tiny model memorises one conversation (in-process trainer, one CPU
process), then `eval` reports its held-out loss by effort and kind, checks its replies, and records
the result in the run home, metrics.jsonl (so `report` shows it) and TensorBoard. About a minute on 2 cores."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from gptoss_cloud.main import app
from gptoss_cloud.contract.spec import RunSpec

pytestmark = pytest.mark.slow

QUESTION = "What colour is the sky on Mars?"
ANSWER = "Butterscotch by day, blue at sunset."
RUN = "evalrun-20261202-060000-abcd"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from gptoss_cloud.trainer.train import run_training

    tmp = tmp_path_factory.mktemp("eval")
    row = {"reasoning_effort": "low", "messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]}
    data = tmp / "train.jsonl"
    data.write_text(json.dumps(row) + "\n")
    spec = RunSpec.model_validate({
        "name": "evalrun", "method": {"kind": "full"},
        "data": {"datasets": [{"path": str(data)}], "max_seq_len": 128, "shuffle": False, "cache_dir": str(tmp / "cache")},
        "optim": {"max_steps": 20, "warmup_steps": 0, "lr": 0.003, "schedule": "constant", "log_every": 5},
        "checkpoint": {"every_steps": 20, "local_dir": str(tmp / "node")},
        "output": {"store": str(tmp / "store"), "merge": True, "report_to": ["tensorboard"]},
    })
    home = tmp / "store" / RUN
    home.mkdir(parents=True)
    (home / "spec.yaml").write_text(spec.to_yaml())
    torch.set_num_threads(2)
    run_training(spec, RUN, str(home), interactive=False)
    held = tmp / "held.jsonl"
    unseen = {"reasoning_effort": "high", "messages": [{"role": "user", "content": "Name a moon of Jupiter."},
                                                        {"role": "assistant", "content": "Europa."}]}
    held.write_text(json.dumps(row) + "\n" + json.dumps(unseen) + "\n")
    return tmp, home, held


def test_eval_reports_loss_breakdowns_checks_replies_and_records_them(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, home, held = trained
    r = CliRunner().invoke(app, ["eval", RUN, "--store", str(tmp / "store"), "--data", str(held), "--max-new-tokens", "40", "-o", "json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert (res["rows"], res["sequences"], res["step"]) == (2, 2, 20)
    assert res["model"] == str(home / "merged") and res["endpoint"] is None
    low, high = res["by_effort"]["low"], res["by_effort"]["high"]
    first_loss = json.loads((home / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert low["loss"] < high["loss"] and low["loss"] < first_loss  # the memorised row against the unseen one
    assert set(res["by_kind"]) == {"final"} and res["by_kind"]["final"]["tokens"] == res["tokens"] == low["tokens"] + high["tokens"]
    assert math.isclose(res["loss"], (low["loss"] * low["tokens"] + high["loss"] * high["tokens"]) / res["tokens"], rel_tol=1e-9)
    gen = res["generation"]
    assert gen["samples"] == 2
    first = gen["replies"][0]
    assert first["valid"] and first["reply"].startswith("<|channel|>final<|message|>" + ANSWER) and first["reply"].endswith("<|return|>")
    assert gen["tool_args_valid_rate"] is None  # no tools in these rows
    # the unseen high-effort row: whatever the model says, it has no analysis there
    assert gen["replies"][1]["analysis_present"] is False and gen["format_valid_rate"] == 0.5

    saved = json.loads((home / "evals" / res["saved"].rsplit("/", 1)[1]).read_text())
    assert saved["loss"] == res["loss"]
    (ev,) = [json.loads(line) for line in (home / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert ev["step"] == 20 and ev["loss"] == res["loss"] and ev["loss_effort_high"] == high["loss"] and ev["format_valid_rate"] == 0.5
    acc = EventAccumulator(str(home / "tensorboard"))
    acc.Reload()
    assert [(s.step, round(s.value, 5)) for s in acc.Scalars("eval/loss")] == [(20, round(res["loss"], 5))]

    page = tmp / "r.html"
    assert CliRunner().invoke(app, ["report", str(home), "--out", str(page)]).exit_code == 0
    assert "<h2>Evaluations</h2>" in page.read_text() and "format_valid_rate" in page.read_text()


def test_eval_prints_its_table_and_evaluates_a_checkpoint(trained):
    tmp, home, held = trained
    r = CliRunner().invoke(app, ["eval", str(home), "--data", str(held), "--checkpoint", "20", "--samples", "1", "--max-new-tokens", "20"])
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert f"{RUN} step 20: {home}/checkpoints/step-20" in out
    for text in ("held-out loss", "effort low", "effort high", "kind final", "generation checks (1 replies)", "format_valid", "100%"):
        assert text in out, text


def test_eval_of_a_missing_checkpoint_names_it(trained):
    tmp, home, held = trained
    r = CliRunner().invoke(app, ["eval", str(home), "--data", str(held), "--checkpoint", "7"])
    assert r.exit_code != 0 and f"no published checkpoint at step 7 (no {home}/checkpoints/step-7/manifest.json)" in r.exception.message
