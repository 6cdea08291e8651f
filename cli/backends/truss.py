"""Baseten Truss backend: render the training project, push it with the truss library, and
follow the job through Baseten's training API.

The truss library is optional (`pip install 'gptoss-cloud[truss]'`) and heavy: it is imported
inside the methods that talk to Baseten, never at module level. After a push, the run home gets
``truss-job.json`` (project and job ids), so ``status``/``logs``/``cancel`` find the job from the
run id alone.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from gptoss_cloud.contract.errors import BackendError, GptossError
from gptoss_cloud.render.truss.train import CONFIG_FILE, TrussProject, render_truss_project
from gptoss_cloud.contract.spec import RunSpec
from gptoss_cloud.contract.store.objects import is_remote, open_store
from gptoss_cloud.backends.base import Backend, Emit, RunStatus, ServeOptions, SubmitOptions, SubmitResult

JOB_FILE = "truss-job.json"
API_KEY_ENV = "BASETEN_API_KEY"
REMOTE_URL_ENV = "BASETEN_REMOTE_URL"
DEFAULT_REMOTE_URL = "https://app.baseten.co"

# Baseten training job states -> the states every backend reports.
_STATES = {
    "TRAINING_JOB_PENDING": "Pending",
    "TRAINING_JOB_CREATED": "Pending",
    "TRAINING_JOB_QUEUED": "Pending",
    "TRAINING_JOB_DEPLOYING": "Pending",
    "TRAINING_JOB_RUNNING": "Running",
    "TRAINING_JOB_COMPLETED": "Succeeded",
    "TRAINING_JOB_FAILED": "Failed",
    "TRAINING_JOB_DEPLOY_FAILED": "Failed",
    "TRAINING_JOB_STOPPED": "Cancelled",
}


def write_project(project: TrussProject, out: Path) -> list[Path]:
    """Write a rendered project folder; the start script keeps its executable bit."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in project.files.items():
        path = out / name
        path.write_text(text)
        if name in project.executable:
            path.chmod(0o755)
        written.append(path)
    return written


def load_project(config_path: Path) -> Any:
    """Load a config.py exactly as `truss train push` does (one TrainingProject or an error)."""
    try:
        from truss_train import loader
    except ImportError:
        raise _truss_missing() from None
    try:
        with loader.import_training_project(config_path) as project:
            return project
    except Exception as e:  # the loader raises ImportError/ValueError/pydantic errors alike
        raise BackendError(f"{config_path} does not load as a Truss training project: {_one_line(e)}") from e


def _one_line(e: Exception) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):  # pydantic: name the model, field, rule and input; drop the docs links
        try:
            return "; ".join(
                f"{getattr(e, 'title', 'value')}.{'.'.join(map(str, err['loc']))}: {err['msg']} (got {err.get('input')!r})"
                for err in errors()
            )
        except Exception:
            pass
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _truss_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("truss_train") is not None


def _truss_missing() -> GptossError:
    return BackendError(
        "the truss library is not installed", hint="pip install 'gptoss-cloud[truss]'"
    )


def baseten_remote() -> Any:
    """A BasetenRemote from BASETEN_API_KEY, else truss' own configuration (env or ~/.trussrc)."""
    try:
        from truss.remote.baseten.remote import BasetenRemote
        from truss.remote.remote_factory import RemoteFactory
    except ImportError:
        raise _truss_missing() from None
    key = os.environ.get(API_KEY_ENV, "").strip()
    if key:
        return BasetenRemote(os.environ.get(REMOTE_URL_ENV, DEFAULT_REMOTE_URL), key)
    try:
        names = RemoteFactory.get_available_config_names()
        if names:
            name = "baseten" if "baseten" in names else names[0]
            return RemoteFactory.create(remote=name)
    except (ValueError, FileNotFoundError) as e:
        raise BackendError(f"Baseten credentials are misconfigured: {e}") from e
    raise BackendError(
        f"no Baseten API key: set {API_KEY_ENV}",
        hint="create a key in Baseten (Settings > API keys), then `export BASETEN_API_KEY=...` or run `truss login`",
    )


def _api_error(action: str, what: str, e: Exception) -> BackendError:
    return BackendError(f"Baseten refused to {action} {what}: {e}")


class TrussBackend(Backend):
    name = "truss"

    # ------------------------------------------------------------------------------- submit
    _remote: Any = None   # the Baseten remote the preflight connected

    def _preflight(self, spec: RunSpec, home: str, opts: SubmitOptions) -> None:
        if not is_remote(spec.output.store):
            raise BackendError(
                f"a Truss run needs an s3:// store that Baseten can reach; output.store is {spec.output.store!r}",
                hint="set output.store (or GPTOSS_STORE) to s3://bucket/prefix, and create the Baseten secrets aws_access_key_id / aws_secret_access_key",
            )
        self._remote = baseten_remote()  # fail on credentials before writing anything

    def _submit(self, spec: RunSpec, run_id: str, home: str, opts: SubmitOptions) -> SubmitResult:
        project = render_truss_project(spec, run_id)
        data = project.data
        rendered = json.dumps(data, indent=2) if opts.output_format == "json" else project.files[CONFIG_FILE]
        details: dict[str, Any] = {"project": data["project"], "nodes": data["node_count"],
                                   "accelerator": f"{data['accelerator']}:{data['accelerator_count']}"}
        if opts.dry_run:
            written = write_project(project, opts.out) if opts.out else []
            if opts.out and _truss_installed():
                load_project(opts.out / CONFIG_FILE)  # the same check `truss train push` makes first
            if not is_remote(spec.output.store):
                details["warning"] = (
                    f"output.store {spec.output.store!r} is local to this machine; pushing needs an s3:// store"
                )
            return SubmitResult(run_id, home, self.name, rendered=rendered, written=written, details=details)

        remote = self._remote or baseten_remote()
        folder = opts.out or Path(tempfile.mkdtemp(prefix=f"gptoss-truss-{run_id}-"))
        written = write_project(project, folder)
        config_path = folder / CONFIG_FILE
        training_project = load_project(config_path)

        store = open_store(home)
        from truss_train import deployment

        try:
            resp = deployment.create_training_job(remote, config_path, training_project)
        except Exception as e:
            raise _api_error("create training job", f"{run_id} in project {data['project']!r}", e) from e
        job = {
            "project_id": resp["training_project"]["id"],
            "project": resp["training_project"].get("name", data["project"]),
            "job_id": resp["id"],
            "remote_url": getattr(remote, "remote_url", None),
            "project_dir": str(folder),
        }
        details["state"] = _STATES.get(resp.get("current_status", ""), "Submitted")
        store.write_bytes(JOB_FILE, json.dumps(job, indent=2).encode())
        details.update(job)
        return SubmitResult(run_id, home, self.name, rendered=rendered, written=written, details=details)

    # ------------------------------------------------------------------------------ run control
    def _job(self, run_id: str, home: str) -> dict:
        store = open_store(home)
        if not store.exists(JOB_FILE):
            raise BackendError(
                f"run {run_id} has no Baseten job record ({home}/{JOB_FILE})",
                hint="it was not pushed with --backend truss, or the push failed before Baseten accepted it",
            )
        return json.loads(store.read_bytes(JOB_FILE))

    def _status(self, run_id: str, home: str) -> RunStatus:
        job = self._job(run_id, home)
        api = baseten_remote().api
        try:
            resp = api.get_training_job(job["project_id"], job["job_id"])
        except Exception as e:
            raise _api_error("read", f"training job {job['job_id']} of run {run_id}", e) from e
        tj = resp.get("training_job", resp)
        raw = tj.get("current_status", "UNKNOWN")
        detail = {"baseten_status": raw, "job_id": job["job_id"], "project": job.get("project"),
                  "project_id": job["project_id"]}
        if tj.get("error_message"):
            detail["error"] = tj["error_message"]
        return RunStatus(run_id, _STATES.get(raw, "Unknown"), self.name, detail)

    def _logs(self, run_id: str, home: str, *, follow: bool, node: int | None) -> Iterator[str]:
        job = self._job(run_id, home)
        api = baseten_remote().api
        from truss.cli.logs.utils import format_log, parse_logs

        if follow:
            from truss.cli.logs.training_log_watcher import TrainingLogWatcher

            logs = TrainingLogWatcher(api, job["project_id"], job["job_id"]).watch(show_spinner=False)
        else:
            from truss.remote.baseten.core import get_training_job_logs_with_pagination

            try:
                raw = get_training_job_logs_with_pagination(api, job["project_id"], job["job_id"])
            except Exception as e:
                raise _api_error("return logs of", f"training job {job['job_id']} of run {run_id}", e) from e
            logs = iter(parse_logs(raw))
        for log in logs:
            if node is not None and not _on_node(log.replica, node):
                continue
            yield format_log(log)

    # ---- serve --------------------------------------------------------------------------------
    def _serve(self, target, opts: ServeOptions, emit: Emit) -> int:
        import yaml

        text = yaml.safe_dump(serve_config(target), sort_keys=True)
        if opts.out is not None:
            opts.out.mkdir(parents=True, exist_ok=True)
            (opts.out / "config.yaml").write_text(text)
            emit(f"wrote {opts.out / 'config.yaml'}", err=True)
        if opts.dry_run or opts.out is not None:
            if opts.out is None:
                emit(text, nl=False)
            emit(f"deploy with: truss push {opts.out or '<folder with this config.yaml>'} --publish", err=True)
            return 0
        try:
            from truss import api as truss_api  # optional: pip install 'gptoss-cloud[truss]'
        except ImportError as e:
            raise GptossError("the truss library is not installed", hint="pip install 'gptoss-cloud[truss]'") from e

        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "config.yaml").write_text(text)
            try:
                deployment = truss_api.push(d, model_name=target.run_id, publish=True)
            except Exception as e:  # the truss library raises its own errors for auth and validation
                raise GptossError(f"truss push of {target.run_id} failed: {e}",
                                  hint="check `truss login` and the Baseten secrets named in the config") from e
        ids = f"{getattr(deployment, 'model_id', '')} {getattr(deployment, 'model_deployment_id', '')}".rstrip()
        emit(f"pushed {target.run_id} to Baseten: {ids}", err=True)
        return 0

    def _cancel(self, run_id: str, home: str) -> None:
        job = self._job(run_id, home)
        api = baseten_remote().api
        try:
            api.stop_training_job(job["project_id"], job["job_id"])
        except Exception as e:
            raise _api_error("stop", f"training job {job['job_id']} of run {run_id}", e) from e


def serve_config(t) -> dict:
    from gptoss_cloud.render.truss.serve import truss_config

    if not is_remote(t.home):
        raise GptossError(f"Baseten cannot read the local store {t.home}", hint="train with output.store: s3://bucket/prefix")
    if t.needs_merge:
        raise GptossError(f"{t.home}/{t.merged_key}/ is not published yet; Truss serves published weights only",
                          hint=f"gptoss-cloud merge {t.run_id}   (or serve with --adapter, or on --backend k8s which merges in the cluster)")
    return truss_config(t)


def _on_node(replica: str | None, node: int) -> bool:
    # Baseten tags each line with the replica that wrote it; its name ends with the node index.
    if replica is None:  # untagged lines belong to no node in particular: show them
        return True
    return replica == str(node) or replica.endswith(f"-{node}")
