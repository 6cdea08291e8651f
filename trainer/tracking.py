"""Rank 0's experiment trackers (``output.report_to``): TensorBoard, MLflow, Weights & Biases.

Each tracker sees exactly what ``metrics.jsonl`` sees (it listens on the run's ``MetricsWriter``): the
step records under their own keys (``loss``, ``eval_loss``, ``lr``, ``tokens_per_s``, ...) and each
event's numbers under ``<event>/<key>`` (``checkpoint/total_s``, ``merge/wall_s``, ``eval/loss``). The
resolved spec is logged once as run parameters, and the run's outputs (``merged/`` or ``adapter/``,
``base/``) as artifact references at the end.

A tracker that cannot start (library missing, no tracking URI, server unreachable) fails the run before
the model loads. One that fails later is switched off with one warning: the hours of training already
done are worth more than the dashboard, and ``metrics.jsonl`` still has every record.

Credentials and endpoints come from each library's own environment variables (``MLFLOW_TRACKING_URI``,
``MLFLOW_TRACKING_TOKEN``/``_USERNAME``/``_PASSWORD``, ``WANDB_API_KEY``, ``WANDB_MODE``, ``WANDB_PROJECT``),
which the backends fill from Secret references; nothing secret travels in the spec.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.contract.spec import RunSpec
from gptoss_cloud.contract.store.objects import is_remote, open_store

log = logging.getLogger("gptoss_cloud.trainer")

# Run homes keep each tracker's local files here (TensorBoard event files, W&B offline runs).
TRACKING_DIRS = {"tensorboard": "tensorboard", "wandb": "wandb"}


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of one metrics.jsonl record, named as trackers show them (``step`` is the x-axis)."""
    event = record.get("event")
    prefix = f"{event}/" if isinstance(event, str) and event else ""
    out = {}
    for k, v in record.items():
        if k in ("step", "event") or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        out[prefix + k] = float(v)
    return out


def flat_params(spec: RunSpec) -> dict[str, str]:
    """The resolved spec as dotted ``section.field`` -> text (lists and mappings as their JSON)."""
    import json

    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = node if isinstance(node, str) else json.dumps(node)

    walk("", spec.model_dump(mode="json"))
    return out


def outputs_of(summary: dict[str, Any]) -> dict[str, str]:
    """The artifact locations a finished run's summary names: the servable model first; the base only
    beside an adapter (the one case where it is written and needed)."""
    out = {}
    for key in ("merged", "output", "base"):
        if key == "base" and summary.get("method") != "lora":
            continue
        uri = summary.get(key)
        if isinstance(uri, str) and uri and uri not in out.values():
            out[key] = uri
    return out


def _needs(package: str, extra: str, tracker: str):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise GptossError(f"output.report_to: {tracker} needs the {package} package, which is not installed",
                          hint=f"pip install 'gptoss-cloud[{extra}]' (or drop {tracker} from output.report_to)") from e


class _LocalDir:
    """A tracker's folder in the run home: the home itself when local, else a temporary folder that
    ``publish`` copies to ``<home>/<key>/`` (so an s3:// run keeps its event files too)."""

    def __init__(self, home: str, key: str):
        self.home, self.key = home, key
        if is_remote(home):
            self._tmp = tempfile.TemporaryDirectory(prefix=f"gptoss-{key}-")
            self.path = Path(self._tmp.name) / key
            self.path.mkdir()
        else:
            self.path = Path(home.removeprefix("file://")) / key
            self.path.mkdir(parents=True, exist_ok=True)

    def publish(self) -> None:
        if not is_remote(self.home):
            return
        st = open_store(self.home)
        for f in sorted(p for p in self.path.rglob("*") if p.is_file()):
            st.upload_file(f, f"{self.key}/{f.relative_to(self.path).as_posix()}")


class Tracker(Protocol):
    name: str

    def log(self, record: dict[str, Any]) -> None: ...
    def finish(self, outputs: dict[str, str]) -> None: ...
    def close(self, ok: bool) -> None: ...


# ----------------------------------------------------------------------------------------- backends
class TensorBoard:
    """Event files in ``<home>/tensorboard/`` (``tensorboard --logdir <home>/tensorboard``)."""

    name = "tensorboard"

    def __init__(self, spec: RunSpec, run_id: str, home: str):
        _needs("tensorboard", "tensorboard", self.name)
        from torch.utils.tensorboard import SummaryWriter

        self.dir = _LocalDir(home, TRACKING_DIRS["tensorboard"])
        self.writer = SummaryWriter(log_dir=str(self.dir.path), flush_secs=30)
        self.writer.add_text("spec", "```yaml\n" + spec.to_yaml() + "```", 0)
        self.writer.add_text("run", f"run {run_id}, home {home}", 0)

    def log(self, record: dict[str, Any]) -> None:
        step = record.get("step") if isinstance(record.get("step"), int) else 0
        for k, v in scalars(record).items():
            self.writer.add_scalar(k, v, step)
        if record.get("event"):
            self.writer.flush()  # events are rare and mark progress: let a live TensorBoard see them

    def finish(self, outputs: dict[str, str]) -> None:
        self.writer.add_text("outputs", "\n\n".join(f"{k}: {v}" for k, v in outputs.items()), 0)

    def close(self, ok: bool) -> None:
        self.writer.close()
        self.dir.publish()


class MLflow:
    """One MLflow run per gptoss run (a resumed attempt continues it), in experiment
    ``MLFLOW_EXPERIMENT_NAME`` or the spec's name, on the server ``MLFLOW_TRACKING_URI`` names."""

    name = "mlflow"
    RUN_TAG = "gptoss.run_id"

    def __init__(self, spec: RunSpec, run_id: str, home: str):
        _needs("mlflow", "mlflow", self.name)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise GptossError("output.report_to: mlflow needs MLFLOW_TRACKING_URI (the tracking server's URL)",
                              hint="set it in the environment (cluster.env for pods), e.g. http://mlflow.mlflow:5000")
        self.client = MlflowClient(tracking_uri=uri)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or spec.name
        try:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
            found = self.client.search_runs([exp_id], filter_string=f"tags.`{self.RUN_TAG}` = '{run_id}'", max_results=1)
            if found:
                self.run_id = found[0].info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                run = self.client.create_run(exp_id, run_name=run_id,
                                             tags={self.RUN_TAG: run_id, "gptoss.home": home, "gptoss.model": spec.model.name})
                self.run_id = run.info.run_id
                params = [Param(k, v[:6000]) for k, v in flat_params(spec).items()]
                for i in range(0, len(params), 100):  # the server takes at most 100 params per batch
                    self.client.log_batch(self.run_id, params=params[i:i + 100])
                self.client.log_text(self.run_id, spec.to_yaml(), "spec.yaml")
        except Exception as e:
            raise GptossError(f"output.report_to: mlflow at {uri}: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                              hint="check MLFLOW_TRACKING_URI and its credentials (MLFLOW_TRACKING_TOKEN or _USERNAME/_PASSWORD)") from e

    def log(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        step = record.get("step") if isinstance(record.get("step"), int) else 0
        now = int(time.time() * 1000)
        metrics = [Metric(k.replace("/", "."), v, now, step) for k, v in scalars(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, outputs: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(f"gptoss.output.{k}", v) for k, v in outputs.items()])
        self.client.log_dict(self.run_id, outputs, "outputs.json")

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


class WandB:
    """A W&B run with the gptoss run id as its id (a resumed attempt continues it), in project
    ``WANDB_PROJECT`` or the spec's name; ``WANDB_MODE=offline`` keeps it in ``<home>/wandb/`` for
    ``wandb sync``."""

    name = "wandb"

    def __init__(self, spec: RunSpec, run_id: str, home: str):
        wandb = _needs("wandb", "wandb", self.name)
        self.dir = _LocalDir(home, TRACKING_DIRS["wandb"])
        try:
            # W&B writes into <dir>/wandb/: the folder above ours.
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or spec.name, id=run_id, name=run_id,
                                  resume="allow", dir=str(self.dir.path.parent), config=spec.model_dump(mode="json"),
                                  settings=wandb.Settings(console="off", x_disable_stats=True))
        except Exception as e:
            raise GptossError(f"output.report_to: wandb: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                              hint="set WANDB_API_KEY (or WANDB_MODE=offline to sync later with `wandb sync`)") from e
        # Events arrive out of step order (an async save's thread reports after later steps): plot
        # everything against the run's own step, not W&B's strictly increasing one.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self._wandb = wandb

    def log(self, record: dict[str, Any]) -> None:
        step = record.get("step") if isinstance(record.get("step"), int) else 0
        values = scalars(record)
        if values:
            self.run.log({"step": step, **values})

    def finish(self, outputs: dict[str, str]) -> None:
        for k, v in outputs.items():
            self.run.summary[f"output/{k}"] = v
        art = self._wandb.Artifact(f"{self.run.id}-model", type="model", metadata=outputs)
        for k, v in outputs.items():
            ref = v if "://" in v else Path(v).resolve().as_uri()
            art.add_reference(ref, name=k, checksum=False)  # a reference: the weights stay in the store
        self.run.log_artifact(art)

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)
        self.dir.publish()


BACKENDS: dict[str, Callable[[RunSpec, str, str], Tracker]] = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}


# ------------------------------------------------------------------------------------------ fan-out
class Trackers:
    """Every tracker of ``output.report_to``, fed by the run's ``MetricsWriter`` (``on_record``)."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = list(trackers)

    def _each(self, what: str, fn: Callable[[Tracker], None]) -> None:
        for t in list(self.trackers):
            try:
                fn(t)
            except Exception as e:  # see the module docstring: tracking never stops a run that trains
                log.warning("%s: %s failed (%s: %s); reporting to %s stops, metrics.jsonl keeps every record",
                            t.name, what, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "", t.name)
                self.trackers.remove(t)

    def on_record(self, record: dict[str, Any]) -> None:
        self._each("logging", lambda t: t.log(record))

    def finish(self, summary: dict[str, Any]) -> None:
        outputs = outputs_of(summary)
        self._each("recording the outputs", lambda t: t.finish(outputs))

    def close(self, ok: bool) -> None:
        closing, self.trackers = self.trackers, []
        for t in closing:
            try:
                t.close(ok)
            except Exception as e:
                log.warning("%s: closing failed (%s: %s)", t.name, type(e).__name__, e)


def open_trackers(spec: RunSpec, run_id: str, home: str) -> Trackers:
    """Start each tracker ``output.report_to`` names (a failure closes those already started)."""
    started: list[Tracker] = []
    try:
        for name in spec.output.report_to:
            started.append(BACKENDS[name](spec, run_id, home))
    except BaseException:
        Trackers(started).close(ok=False)
        raise
    for t in started:
        log.info("reporting to %s", t.name)
    return Trackers(started)
