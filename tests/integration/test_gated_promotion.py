"""Two scheduled ticks end to end, as the CronJob runs them but on this machine: `gptoss-cloud tick` with
the local backend (the tiny model on 2 gloo processes, the real trainer) against a real S3-compatible
server. The first tick trains on that day's good data and is promoted; the second trains on that
day's data after it was corrupted (the answers replaced by garbage), evaluates worse on the same
held-out file and is refused, with the reason recorded; `runs` shows both, and the serve fetcher
follows the record. About two minutes on 2 cores."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from typer.testing import CliRunner

from gptoss_cloud.contract import promoted as pr
from gptoss_cloud.contract.store.objects import open_store
from gptoss_cloud.main import app
from gptoss_cloud.trainer.programs import serve_fetch

pytestmark = pytest.mark.slow

QUESTION = "What colour is the sky on Mars?"
ANSWER = "Butterscotch by day, blue at sunset."
GARBAGE = "qz vlk 83 ;; mmrp xo ## tta kk jrq 7 gh"


def row(answer: str) -> str:
    return json.dumps({"reasoning_effort": "low", "messages": [{"role": "user", "content": QUESTION},
                                                              {"role": "assistant", "content": answer}]}) + "\n"


def put_days(bucket: str, text: str) -> None:
    """That day's data under data/<date>/ (and the next day's, should the test run across midnight)."""
    today = datetime.now(timezone.utc)
    for day in (today, today + timedelta(days=1)):
        open_store(bucket).write_bytes(f"data/{day:%Y-%m-%d}/train.jsonl", text.encode())


def test_two_ticks_one_promoted_one_refused(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "250")
    bucket = s3_bucket.rsplit("/", 1)[0]
    store = f"{bucket}/runs"
    open_store(bucket).write_bytes("held/held.jsonl", row(ANSWER).encode())
    spec = tmp_path / "daily.yaml"
    # Full fine-tuning of the tiny model memorises one conversation in 20 steps (test_local_e2e.py).
    spec.write_text(
        "name: bot\nmodel: {name: tiny}\nmethod: {kind: full}\n"
        f"data: {{datasets: [{{path: '{bucket}/data/{{date}}/train.jsonl'}}], max_seq_len: 128, shuffle: false, "
        f"cache_dir: {tmp_path / 'data-cache'}}}\n"
        "optim: {max_steps: 20, warmup_steps: 0, lr: 0.003, schedule: constant, log_every: 10}\n"
        "output: {merge: true}\ncluster: {backend: local}\n"
        f"promote: {{name: bot, eval_data: {bucket}/held/held.jsonl, samples: 1, max_new_tokens: 24, "
        "max_eval_loss_regression: 0.0, min_format_valid_rate: 0.5}\n"
    )
    tick = ["tick", str(spec), "--store", store, "--poll", "0.5", "-o", "json"]

    put_days(bucket, row(ANSWER))
    r = CliRunner().invoke(app, tick)
    assert r.exit_code == 0, r.output
    good = json.loads(r.stdout.strip().splitlines()[-1])
    assert good["decision"] == "promoted" and "no run promoted yet" in good["reason"], good
    assert good["eval"]["format_valid_rate"] == 1.0

    put_days(bucket, row(GARBAGE))
    r = CliRunner().invoke(app, tick)
    assert r.exit_code == 0, r.output
    bad = json.loads(r.stdout.strip().splitlines()[-1])
    assert bad["decision"] == "refused" and bad["previous"] == good["run_id"], bad
    assert f"vs promoted {good['eval']['loss']:.4f}" in bad["reason"] and "beyond max_eval_loss_regression 0" in bad["reason"]
    assert bad["eval"]["loss"] > good["eval"]["loss"]

    # each tick trained on its own day's data, written down in its resolved spec
    stored = open_store(f"{store}/{bad['run_id']}").read_bytes("spec.yaml").decode()
    assert f"{bucket}/data/20" in stored and "{date}" not in stored
    current = pr.read_record(store, "bot")
    assert current.run_id == good["run_id"]
    history, unreadable = pr.read_history(store, "bot")
    assert [(h.run_id, h.decision) for h in history] == [(good["run_id"], "promoted"), (bad["run_id"], "refused")]
    assert unreadable == [] and history[1].reason == bad["reason"]

    r = CliRunner().invoke(app, ["runs", "--store", store])
    assert r.exit_code == 0, r.output
    lines = {line.split()[0]: line for line in r.stdout.splitlines() if line.startswith("bot-")}
    assert "PROMOTED as bot" in lines[good["run_id"]]
    assert "refused for bot: " in lines[bad["run_id"]] and "beyond max_eval_loss_regression" in lines[bad["run_id"]]

    # the vLLM pod's init container, started now, fetches the promoted run's weights
    assert serve_fetch.main([store, str(tmp_path / "models"), "--promoted", "bot"]) == 0
    assert (tmp_path / "models" / "config.json").is_file()
