"""The real trainer (one CPU process, tiny preset) reporting to TensorBoard, a real ``mlflow server``
on 127.0.0.1 and W&B in offline mode; each is read back with its own library and compared with
metrics.jsonl. About 30 s on 2 cores, most of it the MLflow server starting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import wandb_records
from support import free_port

from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.contract.spec import RunSpec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    exe = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=open(root / "server.log", "wb"), stderr=subprocess.STDOUT, cwd=root,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}: {(root / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError("mlflow server did not answer /health within 120 s")
        time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def _sample(length: int, seed: int):
    import random

    r = random.Random(seed)
    ids = [r.randrange(200_000) for _ in range(length)]
    return SimpleNamespace(input_ids=ids, labels=[-100] * 4 + ids[4:], position_ids=list(range(length)), seq_lens=[length])


def _spec(report_to: list[str], tmp_path: Path, **output) -> RunSpec:
    return RunSpec.model_validate({
        "name": "tracked", "model": {"name": "tiny", "init": "random"}, "data": {"max_seq_len": 32},
        "method": {"kind": "full"}, "optim": {"max_steps": 3, "lr": 1e-3, "warmup_steps": 1, "log_every": 1},
        "checkpoint": {"every_steps": 2, "local_dir": str(tmp_path / "node")},
        "output": {"merge": True, "report_to": report_to, **output},
    })


def _train(spec: RunSpec, run_id: str, home: str) -> dict:
    from gptoss_cloud.trainer.train import run_training

    torch.set_num_threads(2)
    ds = SimpleNamespace(train=[_sample(32, i) for i in range(4)], validation=[])
    return run_training(spec, run_id, home, datasets=ds, interactive=False)


def _records(home: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (home / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "event" not in r], [r for r in rows if "event" in r]


def test_trainer_reports_every_record_to_tensorboard_mlflow_and_wandb(tmp_path, monkeypatch, mlflow_server):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tracking-test")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    home = tmp_path / "run"
    summary = _train(_spec(["tensorboard", "mlflow", "wandb"], tmp_path), "tracked-1", str(home))
    steps, events = _records(home)
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert [(e["event"], e["step"]) for e in events] == [("checkpoint", 2), ("checkpoint", 3), ("merge", 3)]

    # TensorBoard: every step record's numbers under their metrics.jsonl names, events under <event>/.
    acc = EventAccumulator(str(home / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens"):
        got = [(s.step, s.value) for s in acc.Scalars(key)]
        assert got == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in steps], key
    assert [(s.step, s.value) for s in acc.Scalars("checkpoint/total_s")] == [
        (e["step"], pytest.approx(e["total_s"], rel=1e-6)) for e in events if e["event"] == "checkpoint"]
    assert [s.step for s in acc.Scalars("merge/wall_s")] == [3]
    assert "mfu" not in acc.Tags()["scalars"]  # None on CPU: not a number, not plotted as 0
    spec_text = acc.Tensors("spec/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "max_steps: 3" in spec_text and "report_to:" in spec_text
    assert summary["merged"] in acc.Tensors("outputs/text_summary")[0].tensor_proto.string_val[0].decode()

    # MLflow: one finished run holding the spec as params, each metric's history, the outputs.
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("tracking-test")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`gptoss.run_id` = 'tracked-1'")
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked-1"
    assert run.data.params["optim.max_steps"] == "3" and run.data.params["method.kind"] == "full"
    assert run.data.params["output.report_to"] == '["tensorboard", "mlflow", "wandb"]'
    hist = client.get_metric_history(run.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in hist) == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in steps]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "checkpoint.total_s")) == [2, 3]
    assert run.data.tags["gptoss.output.merged"] == summary["merged"] == str(home / "merged")
    got = client.download_artifacts(run.info.run_id, "outputs.json", str(tmp_path / "dl"))
    assert json.loads(Path(got).read_text())["merged"] == summary["merged"]
    assert "max_steps: 3" in Path(client.download_artifacts(run.info.run_id, "spec.yaml", str(tmp_path / "dl"))).read_text()

    # W&B offline: the run under <home>/wandb/, read back from the transaction log `wandb sync` uploads.
    (offline,) = (home / "wandb").glob("offline-run-*-tracked-1")
    log = offline / "run-tracked-1.wandb"
    rows = wandb_records.history(log)
    assert [(h["step"], h["loss"]) for h in rows if "loss" in h] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in steps]
    assert [h["step"] for h in rows if "checkpoint/total_s" in h] == [2, 3]
    assert [h["step"] for h in rows if "merge/wall_s" in h] == [3]
    assert wandb_records.config(log)["optim"]["max_steps"] == 3
    assert wandb_records.summary(log)["output/merged"] == summary["merged"]
    (art,) = wandb_records.artifacts(log)
    assert art.type == "model" and art.name == "tracked-1-model"
    refs = [e.ref for e in art.manifest.contents]  # a local folder is referenced file by file
    assert Path(summary["merged"]).as_uri() + "/config.json" in refs
    assert all(r.startswith(Path(summary["merged"]).as_uri() + "/") for r in refs)


def test_a_resumed_attempt_continues_the_same_mlflow_run(tmp_path, monkeypatch, mlflow_server):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tracking-resume")
    spec = _spec(["mlflow"], tmp_path)
    _train(spec, "tracked-2", str(tmp_path / "run"))
    _train(spec.model_copy(update={"optim": spec.optim.model_copy(update={"max_steps": 4})}), "tracked-2", str(tmp_path / "run"))
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("tracking-resume")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == 4  # step 4 came from the resume


def test_an_unreachable_mlflow_fails_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    home = tmp_path / "run"
    with pytest.raises(GptossError) as e:
        _train(_spec(["tensorboard", "mlflow"], tmp_path), "tracked-3", str(home))
    assert e.value.message.startswith(f"output.report_to: mlflow at {os.environ['MLFLOW_TRACKING_URI']}: ")
    assert not (home / "metrics.jsonl").exists() and not (home / "checkpoints").exists()


def test_an_s3_home_keeps_its_tensorboard_files(tmp_path, s3_bucket):
    from gptoss_cloud.contract.store.objects import join, open_store
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    home = join(s3_bucket, "tracked-4")
    spec = _spec(["tensorboard"], tmp_path, merge=False)
    _train(spec, "tracked-4", home)
    st = open_store(home)
    (key,) = [k for k in st.list("tensorboard") if "tfevents" in k]
    local = tmp_path / "tb" / Path(key).name
    st.download_file(key, local)
    acc = EventAccumulator(str(local.parent))
    acc.Reload()
    assert [s.step for s in acc.Scalars("loss")] == [1, 2, 3]
