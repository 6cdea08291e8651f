"""The backend protocol: submit, status, logs, cancel, serve and delete.

Public methods own the guards and the user-facing flow; implementations fill the ``_hooks``. Commands
pick a backend with :func:`get_backend` and call these methods; none of them branches on a backend's name.
Every backend writes the resolved spec to the run home first, so ``status``/``runs``/``merge``/
``--resume`` work the same whatever backend trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.contract.spec import RunSpec

if TYPE_CHECKING:
    from gptoss_cloud.contract.progress import RunRow
    from gptoss_cloud.render.k8s.serve import ServeTarget

# How a backend speaks to the user: emit(text) for results (stdout), emit(text, err=True) for progress and notes.
Emit = Callable[..., None]


@dataclass
class SubmitOptions:
    dry_run: bool = False
    out: Path | None = None          # write rendered artifacts here instead of printing/applying
    output_format: str = "yaml"      # yaml | json (dry-run printing)
    force: bool = False              # submit even if the plan says it cannot fit
    resume: bool = False             # continue an existing run id
    detach: bool = False             # local: run in the background (status/logs/cancel find it by pid)


@dataclass
class ServeOptions:
    dry_run: bool = False
    out: Path | None = None          # write the rendered objects / Truss config into this folder
    output_format: str = "yaml"      # yaml | json
    vllm_python: str | None = None   # local: the python whose environment has vLLM
    api_key_env: str | None = None   # local: require the API key held in this environment variable


@dataclass
class SubmitResult:
    run_id: str
    home: str
    backend: str
    rendered: str | None = None      # what would be / was applied (dry-run prints this)
    written: list[Path] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunStatus:
    run_id: str
    state: str                       # Pending | Running | Succeeded | Failed | Cancelled | Unknown
    backend: str
    detail: dict[str, Any] = field(default_factory=dict)


class Backend:
    name: str = "base"

    def prepare(self, spec: RunSpec) -> RunSpec:
        """Adapt the resolved spec to where it will run (e.g. the local machine's GPUs), before it is
        planned and written to ``<home>/spec.yaml``. Refuse what this backend cannot run. Default: as is."""
        return spec

    def submit(self, spec: RunSpec, run_id: str, home: str, opts: SubmitOptions,
               say: Callable[[str], None] | None = None) -> SubmitResult:
        """Plan (the one fit check of a submit: refuse what cannot fit unless ``opts.force``), record the resolved
        spec in ``<home>/spec.yaml`` (not for a dry run), then hand over. The planner's notes (the configuration it
        chose, a forced fit) go to ``say`` before anything starts, else into ``result.details["plan"]``. A fresh home the backend never got to use
        is removed again, so a refused submit leaves no run behind."""
        from gptoss_cloud.contract.runs import write_run_spec

        spec, chosen = choose_configuration(spec)
        note = plan_note(spec, opts.force)
        notes = [n for n in (chosen, note) if n]
        if say is not None:  # before the backend starts: a local run trains in the foreground
            for n in notes:
                say(n)
            notes = []
        if opts.dry_run:
            result = self._submit(spec, run_id, home, opts)
        else:
            self._preflight(spec, home, opts)  # credentials, a store the backend can reach: before anything is written
            write_run_spec(home, spec)
            try:
                result = self._submit(spec, run_id, home, opts)
            except BaseException:
                if not opts.resume:
                    _remove_unused_home(run_id, home)
                raise
        if notes:
            result.details["plan"] = "\n".join(notes)
        return result

    def status(self, run_id: str, home: str) -> RunStatus:
        return self._status(run_id, home)

    def logs(self, run_id: str, home: str, *, follow: bool = False, node: int | None = None) -> Iterator[str]:
        return self._logs(run_id, home, follow=follow, node=node)

    def cancel(self, run_id: str, home: str) -> None:
        self._cancel(run_id, home)

    def serve(self, target: ServeTarget, opts: ServeOptions, emit: Emit) -> int:
        """Serve a trained run (``backends.serving.resolve_target`` chose what): render, then apply, write or
        print. Returns 0, or the server's exit code where it runs in the foreground."""
        return self._serve(target, opts, emit)

    def describe_delete(self, run_id: str, spec: RunSpec) -> str | None:
        """What :meth:`delete` would remove outside the store, for the confirmation prompt (None: nothing)."""
        return None

    def delete(self, run_id: str, home: str, spec: RunSpec) -> list[str]:
        """Remove what this backend made for a run outside its store home; return one line per thing removed.
        The store home itself is the caller's to delete, after this."""
        return self._delete(run_id, home, spec)

    # ---- hooks --------------------------------------------------------------------------------
    def _preflight(self, spec: RunSpec, home: str, opts: SubmitOptions) -> None:
        """What must hold before a (not dry-run) submit writes anything. Default: nothing."""

    def _submit(self, spec: RunSpec, run_id: str, home: str, opts: SubmitOptions) -> SubmitResult:
        raise GptossError(f"backend {self.name} cannot submit")

    def _status(self, run_id: str, home: str) -> RunStatus:
        raise GptossError(f"backend {self.name} does not report status")

    def _logs(self, run_id: str, home: str, *, follow: bool, node: int | None) -> Iterator[str]:
        raise GptossError(f"backend {self.name} does not stream logs")

    def _cancel(self, run_id: str, home: str) -> None:
        raise GptossError(f"backend {self.name} cannot cancel runs")

    def _serve(self, target: ServeTarget, opts: ServeOptions, emit: Emit) -> int:
        raise GptossError(f"backend {self.name} cannot serve runs")

    def _delete(self, run_id: str, home: str, spec: RunSpec) -> list[str]:
        return []


def choose_configuration(spec: RunSpec) -> tuple[RunSpec, str | None]:
    """Optimizer, CPU offload and recomputation: the fastest configuration that fits, unless the spec names one
    (``contract.plan.configs.choose``). A model whose shape only the pod can read keeps the spec's."""
    from gptoss_cloud.contract.errors import SpecError
    from gptoss_cloud.contract.plan.configs import choose
    from gptoss_cloud.contract.plan.sizes import local_shape

    try:
        return choose(spec, local_shape(spec.model.name, spec.model.layers))
    except SpecError:
        return spec, None


def plan_note(spec: RunSpec, force: bool) -> str | None:
    """The memory plan's verdict before anything starts: PlanError (the numbers and what would fit) unless
    ``force``; a note when forced past it, or when only the pod can read the model's shape (a hub id, s3://)."""
    from gptoss_cloud.contract.errors import PlanError, SpecError
    from gptoss_cloud.contract.plan.memory import check_fit
    from gptoss_cloud.contract.plan.sizes import local_shape

    try:
        check_fit(spec, local_shape(spec.model.name, spec.model.layers))
    except PlanError as e:
        if not force:
            raise
        return f"warning: {e.message} (submitting anyway: --force)"
    except SpecError as e:
        return f"not planned: {e.message}"
    return None


def _remove_unused_home(run_id: str, home: str) -> None:
    """Remove what submit wrote if nothing else was: the home's spec.yaml, and for a remote home the
    local state folder the local backend may have made. Deleted as a prefix, which every store honours."""
    import shutil

    from gptoss_cloud.contract.runs import SPEC_FILE
    from gptoss_cloud.contract.store.objects import is_remote, open_store
    from gptoss_cloud.contract.runs import state_dir

    st = open_store(home)
    if st.list("") == [SPEC_FILE]:
        st.delete("")
        if not is_remote(home) and Path(home).is_dir() and not any(Path(home).iterdir()):
            Path(home).rmdir()
    if is_remote(home):
        sd = state_dir(run_id, home)
        if sd.is_dir() and {p.name for p in sd.iterdir()} <= {SPEC_FILE}:
            shutil.rmtree(sd)


BACKENDS = ("local", "k8s", "truss")


def get_backend(name: str) -> Backend:
    """The backend called ``name``, imported only when asked for (the Kubernetes and Truss clients are heavy)."""
    if name == "local":
        from gptoss_cloud.backends.local import LocalBackend

        return LocalBackend()
    if name == "k8s":
        from gptoss_cloud.backends.k8s import KubernetesBackend

        return KubernetesBackend()
    if name == "truss":
        from gptoss_cloud.backends.truss import TrussBackend

        return TrussBackend()
    raise GptossError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")


def describe_run(run_id: str, home: str) -> RunRow:
    """One row for ``runs``: the backend's state when it can tell, else what the store records."""
    from gptoss_cloud.contract.progress import RunRow, progress, read_metrics, read_summary, summary_state
    from gptoss_cloud.contract.runs import read_run_spec

    spec = read_run_spec(home)
    backend = spec.cluster.backend
    row = RunRow(run_id=run_id, home=home, backend=backend, state="Unknown", model=spec.model.name, method=spec.method.kind)
    try:
        row.state = get_backend(backend).status(run_id, home).state
    except GptossError as e:
        row.error = e.message
        row.state = summary_state(read_summary(home)) or "Unknown"
    row.progress = progress(read_metrics(home), spec)
    return row
