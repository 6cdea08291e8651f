"""The tracker plumbing that needs no server: what a record becomes, the spec as parameters, the
report_to field, a missing extra, and a tracker that fails mid-run."""

from __future__ import annotations

import logging
import sys

import pytest

from gptoss_cloud.contract.errors import GptossError, SpecError
from gptoss_cloud.contract.spec import RunSpec, load_spec
from gptoss_cloud.trainer.tracking import Trackers, flat_params, open_trackers, outputs_of, scalars


def test_step_record_keeps_its_keys_and_events_are_prefixed():
    step = {"step": 5, "loss": 2.5, "lr": 1e-4, "mfu": None, "tokens": 640, "epoch": 0.5}
    assert scalars(step) == {"loss": 2.5, "lr": 1e-4, "tokens": 640.0, "epoch": 0.5}
    ck = {"event": "checkpoint", "step": 4, "mode": "async", "total_s": 1.5, "upload_s": None, "bytes": 1024}
    assert scalars(ck) == {"checkpoint/total_s": 1.5, "checkpoint/bytes": 1024.0}


def test_non_numbers_bools_and_non_finite_values_are_left_out():
    assert scalars({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "ok": True, "name": "x", "lr": 0.1}) == {"lr": 0.1}


def test_spec_becomes_dotted_parameters():
    spec = RunSpec.model_validate({"optim": {"max_steps": 7}, "output": {"report_to": ["tensorboard"]}})
    p = flat_params(spec)
    assert p["optim.max_steps"] == "7" and p["model.name"] == "tiny" and p["optim.betas"] == "[0.9, 0.95]"
    assert p["output.report_to"] == '["tensorboard"]' and p["data.datasets"].startswith('[{"path": "sample"')
    assert all(isinstance(v, str) for v in p.values())


def test_outputs_name_the_servable_model_first_and_skip_missing():
    assert outputs_of({"method": "lora", "merged": "s3://b/r/merged", "output": "s3://b/r/adapter", "base": None}) == {
        "merged": "s3://b/r/merged", "output": "s3://b/r/adapter"}
    assert outputs_of({"method": "lora", "output": "/r/adapter", "base": "/r/base"}) == {"output": "/r/adapter", "base": "/r/base"}
    # a full fine-tune's summary names a base it never wrote
    assert outputs_of({"method": "full", "output": "/r/merged", "merged": "/r/merged", "base": "/r/base"}) == {"merged": "/r/merged"}


def test_report_to_accepts_any_subset_and_defaults_to_none(tmp_path):
    assert RunSpec().output.report_to == []
    f = tmp_path / "s.yaml"
    f.write_text("output: {report_to: [mlflow, tensorboard]}\n")
    assert load_spec(f).output.report_to == ["mlflow", "tensorboard"]


@pytest.mark.parametrize("value, message", [
    ("[comet]", "output.report_to.0: Input should be 'tensorboard', 'wandb' or 'mlflow'; got 'comet'"),
    ("[wandb, wandb]", "output.report_to: output.report_to names wandb more than once"),
])
def test_report_to_errors_name_the_key(tmp_path, value, message):
    f = tmp_path / "s.yaml"
    f.write_text(f"output: {{report_to: {value}}}\n")
    with pytest.raises(SpecError) as e:
        load_spec(f)
    assert message in e.value.message


def test_missing_extra_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as on an install without the [wandb] extra
    spec = RunSpec.model_validate({"output": {"report_to": ["wandb"]}})
    with pytest.raises(GptossError) as e:
        open_trackers(spec, "r-1", str(tmp_path))
    assert e.value.message == "output.report_to: wandb needs the wandb package, which is not installed"
    assert "pip install 'gptoss-cloud[wandb]'" in e.value.hint


def test_mlflow_without_a_tracking_uri_is_refused(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = RunSpec.model_validate({"output": {"report_to": ["mlflow"]}})
    with pytest.raises(GptossError, match="mlflow needs MLFLOW_TRACKING_URI"):
        open_trackers(spec, "r-1", str(tmp_path))


def test_a_failed_start_closes_the_trackers_already_started(monkeypatch, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = RunSpec.model_validate({"output": {"report_to": ["tensorboard", "mlflow"]}})
    with pytest.raises(GptossError):
        open_trackers(spec, "r-1", str(tmp_path))
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()  # the writer was closed, so what it wrote is on disk
    assert "spec/text_summary" in acc.Tags()["tensors"]


class _Recorder:
    def __init__(self, name: str, fail_on: int | None = None):
        self.name, self.fail_on, self.seen, self.closed = name, fail_on, [], None

    def log(self, record):
        if self.fail_on is not None and len(self.seen) == self.fail_on:
            raise ConnectionError("server went away\nsecond line")
        self.seen.append(record)

    def finish(self, outputs):
        self.seen.append(("outputs", outputs))

    def close(self, ok):
        self.closed = ok


def test_a_tracker_failing_mid_run_is_switched_off_with_one_warning(caplog):
    good, bad = _Recorder("good"), _Recorder("bad", fail_on=1)
    t = Trackers([good, bad])
    with caplog.at_level(logging.WARNING, logger="gptoss_cloud.trainer"):
        for step in (1, 2, 3):
            t.on_record({"step": step, "loss": 1.0})
        t.finish({"merged": "/r/merged"})
        t.close(ok=True)
    assert [r["step"] for r in good.seen[:3]] == [1, 2, 3] and good.seen[3] == ("outputs", {"merged": "/r/merged"})
    assert [r["step"] for r in bad.seen] == [1] and bad.closed is None  # never called again after failing
    assert good.closed is True
    (msg,) = caplog.messages
    assert msg == "bad: logging failed (ConnectionError: server went away); reporting to bad stops, metrics.jsonl keeps every record"
