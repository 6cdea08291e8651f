"""`submit` a run to a backend, and control it: `status`, `logs`, `cancel`, `runs`.

Every backend goes through the same flow here: resolve the spec (flags override it), let the backend
adapt it to where it runs, plan, write ``<home>/spec.yaml``, then hand over. Run control finds the
backend of an existing run in its ``spec.yaml``, so it works whatever backend trained it.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from gptoss_cloud.contract.errors import GptossError, SpecError
from gptoss_cloud.contract.store.objects import is_remote
from gptoss_cloud.commands.common import SpecArg, StoreOpt, resolve

OVERRIDES = "overrides the spec"


def register(app: typer.Typer) -> None:
    app.command("submit")(submit)
    app.command("status")(status)
    app.command("logs")(logs)
    app.command("cancel")(cancel)
    app.command("runs")(runs)


RunArg = Annotated[str, typer.Argument(help="run id (looked up in the store) or the full URI/path of a run home", show_default=False)]
FormatOpt = Annotated[str, typer.Option("-o", "--output", help="yaml | json")]


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def _store_of(store: str | None) -> str:
    """The store a RUN argument is looked up in: --store > GPTOSS_STORE > user config > ./runs."""
    uri = resolve(None, output__store=store).output.store
    return uri if is_remote(uri) else str(Path(uri.removeprefix("file://")).expanduser().resolve())


def _find_run(ref: str, store: str | None, *, strict: bool = False) -> tuple[str, str]:
    from gptoss_cloud.contract.runs import resolve_run

    return resolve_run(ref, _store_of(store), strict=strict)


# ------------------------------------------------------------------------------------------ submit
def submit(
    spec: SpecArg = None,
    model: Annotated[Optional[str], typer.Option("--model", help=f"20b | 120b | tiny | folder | hub id | s3:// prefix; {OVERRIDES}")] = None,
    nodes: Annotated[Optional[int], typer.Option("--nodes", min=1, help=f"nodes; {OVERRIDES}")] = None,
    gpus_per_node: Annotated[Optional[int], typer.Option("--gpus-per-node", min=1, help=f"GPUs per node; {OVERRIDES}")] = None,
    method: Annotated[Optional[str], typer.Option("--method", help=f"lora | full; {OVERRIDES}")] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", help=f"one dataset (file, s3:// URI, hub id or 'sample') replacing the spec's list; {OVERRIDES}")] = None,
    backend: Annotated[Optional[str], typer.Option("--backend", help=f"k8s | truss | local; {OVERRIDES} and GPTOSS_BACKEND")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help=f"run name (prefix of the run id); {OVERRIDES}")] = None,
    store: StoreOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print (or write to --out) what would run; write nothing to the store, start nothing")] = False,
    output: FormatOpt = "yaml",
    out: Annotated[Optional[Path], typer.Option("--out", help="with --dry-run: write the rendered artifacts into this folder")] = None,
    force: Annotated[bool, typer.Option("--force", help="submit even if the memory plan says it cannot fit")] = False,
    resume: Annotated[Optional[str], typer.Option("--resume", help="continue this run (id or URI) from its last checkpoint: same id and home; its stored spec is the base unless SPEC is given")] = None,
    detach: Annotated[bool, typer.Option("--detach", help="local backend: run in the background (follow with `logs -f`)")] = False,
) -> None:
    """Submit a fine-tuning run. Flags override the spec (CLI flag > GPTOSS_* > SPEC > user config > defaults)."""
    from gptoss_cloud.backends.base import SubmitOptions, get_backend
    from gptoss_cloud.contract.runs import new_run_id, run_home
    from gptoss_cloud.contract.templates import expand_for_run

    if output not in ("yaml", "json"):
        raise SpecError(f"-o/--output must be yaml or json, not {output!r}")
    if method is not None and method not in ("lora", "full"):
        raise SpecError(f"--method must be lora or full, not {method!r}")
    if out is not None and not dry_run:
        raise SpecError("--out is for --dry-run (it writes the rendered artifacts instead of applying them)")
    overrides: dict[str, Any] = {
        "model.name": model, "parallelism.nodes": nodes, "parallelism.gpus_per_node": gpus_per_node,
        "method.kind": method, "cluster.backend": backend, "name": name, "output.store": store,
        "data.datasets": [{"path": dataset}] if dataset else None,
    }

    if resume:
        run_id, home, s = _resume_spec(resume, spec, store, overrides)
    else:
        s = resolve(spec, **{k.replace(".", "__"): v for k, v in overrides.items()})
        run_id = new_run_id(s.name)
        home = None
    s = expand_for_run(s, run_id)  # dataset templates ({date}, ...) from the run's start time, kept in spec.yaml
    be = get_backend(s.cluster.backend)
    s = be.prepare(s)
    if home is None:
        home = run_home(s.output.store, run_id)
    opts = SubmitOptions(dry_run=dry_run, out=out, output_format=output, force=force, resume=bool(resume), detach=detach)
    if dry_run:
        res = be.submit(s, run_id, home, opts, say=_say_plan)
        if res.written:
            for p in res.written:
                _console(stderr=True).print(f"wrote {p}")
        elif res.rendered is not None:
            typer.echo(res.rendered, nl=False)
        return

    err = _console(stderr=True)
    err.print(f"[bold]{'resuming' if resume else 'run'}[/] {run_id} on {be.name}\n  home: {home}")
    res = be.submit(s, run_id, home, opts, say=_say_plan)
    state = res.details.get("state", "Submitted")
    if output == "json":
        typer.echo(json.dumps({"run_id": run_id, "home": home, "backend": be.name, "state": state,
                               **{k: v for k, v in res.details.items() if k in ("attempt", "log", "pid")}}))
    else:
        # Later commands find the run by id only in the store they resolve by default; name it otherwise.
        run_store = home.rsplit("/", 1)[0]
        store_flag = "" if run_store == _store_of(None) else f" --store {run_store}"
        con = _console()
        con.print(f"run {run_id}: {state}\n  home: {home}")
        con.print("next:")
        con.print(f"  gptoss-cloud status {run_id}{store_flag}")
        con.print(f"  gptoss-cloud logs {run_id}{store_flag} -f")
        con.print(f"  gptoss-cloud chat {run_id}{store_flag} --prompt 'Hello'")
        con.print(f"  gptoss-cloud serve {run_id}{store_flag}")


def _resume_spec(ref: str, spec: Path | None, store: str | None, overrides: dict[str, Any]):
    """Same id and home; the run's stored spec is the base unless a SPEC file is given."""
    from gptoss_cloud.contract.runs import SPEC_FILE, read_run_spec_bytes

    run_id, home = _find_run(ref, store)
    overrides = {**overrides, "checkpoint.resume": "auto", "output.store": home.rsplit("/", 1)[0]}
    flat = {k.replace(".", "__"): v for k, v in overrides.items()}
    if spec is not None:
        return run_id, home, resolve(spec, **flat)
    with tempfile.TemporaryDirectory() as tmp:
        stored = Path(tmp) / SPEC_FILE
        stored.write_bytes(read_run_spec_bytes(home))
        return run_id, home, resolve(stored, **flat)


def _say_plan(note: str) -> None:
    style = "yellow" if note.startswith("warning") else "dim"
    _console(stderr=True).print(f"[{style}]{note}[/]")


# ------------------------------------------------------------------------------------- run control
def status(
    run: RunArg,
    store: StoreOpt = None,
    output: Annotated[str, typer.Option("-o", "--output", help="text | json")] = "text",
) -> None:
    """State of a run (from its backend) and its progress (from metrics.jsonl in the store)."""
    from gptoss_cloud.backends.base import get_backend
    from gptoss_cloud.contract.progress import format_progress, progress, read_metrics
    from gptoss_cloud.contract.runs import read_run_spec
    from gptoss_cloud.report.sparkline import loss_line

    run_id, home = _find_run(run, store)
    spec = read_run_spec(home)
    st = get_backend(spec.cluster.backend).status(run_id, home)
    metrics = read_metrics(home)
    prog = progress(metrics, spec)
    if output == "json":
        typer.echo(json.dumps({"run_id": run_id, "home": home, "backend": st.backend, "state": st.state,
                               "progress": prog, "detail": st.detail}, default=str))
        return
    con = _console()
    con.print(f"[bold]{run_id}[/]  {st.state}  ({st.backend})")
    con.print(f"  home: {home}")
    con.print(f"  progress: {format_progress(prog)}")
    if line := loss_line(metrics):
        con.print(f"  loss: {line}")
    for k, v in st.detail.items():
        if k not in ("command",):
            con.print(f"  {k}: {v}")


def logs(
    run: RunArg,
    follow: Annotated[bool, typer.Option("-f", "--follow", help="keep printing while the run runs")] = False,
    node: Annotated[Optional[int], typer.Option("--node", min=0, help="node index (default: node 0, rank 0)")] = None,
    store: StoreOpt = None,
) -> None:
    """Print a run's logs (rank 0 of node 0 unless --node)."""
    from gptoss_cloud.backends.base import get_backend
    from gptoss_cloud.contract.runs import read_run_spec

    run_id, home = _find_run(run, store)
    be = get_backend(read_run_spec(home).cluster.backend)
    try:
        for line in be.logs(run_id, home, follow=follow, node=node):
            sys.stdout.write(line if line.endswith("\n") else line + "\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass


def cancel(run: RunArg, store: StoreOpt = None) -> None:
    """Stop a running run. Its checkpoints stay; `submit --resume RUN` continues it."""
    from gptoss_cloud.backends.base import get_backend
    from gptoss_cloud.contract.runs import read_run_spec

    run_id, home = _find_run(run, store, strict=True)  # a signal goes only to a validated run's own processes
    be = get_backend(read_run_spec(home).cluster.backend)
    be.cancel(run_id, home)
    typer.echo(f"cancelled {run_id}")


def runs(
    store: StoreOpt = None,
    output: Annotated[str, typer.Option("-o", "--output", help="table | json")] = "table",
) -> None:
    """List the runs in the store with backend, state and progress."""
    from gptoss_cloud.failure import one_line
    from gptoss_cloud.backends.base import describe_run
    from gptoss_cloud.contract.progress import RunRow, format_progress, list_run_ids
    from gptoss_cloud.contract.runs import is_run_id
    from gptoss_cloud.contract.safe_yaml import quote
    from gptoss_cloud.contract.store.objects import join

    uri = _store_of(store)
    rows = []
    for rid in list_run_ids(uri):
        if not is_run_id(rid):
            # A name from the store's listing that is not a run id is reported, never read or printed raw.
            rows.append(RunRow(run_id=quote(rid), home=join(uri, quote(rid)), backend="?", state="Unknown",
                               error="not a run id: its folder was not read"))
            continue
        try:
            rows.append(describe_run(rid, join(uri, rid)))
        except Exception as e:  # one unreadable home (corrupt, hostile, unreachable) must not hide the others
            msg = e.message if isinstance(e, GptossError) else f"{type(e).__name__}: {one_line(e)}"
            rows.append(RunRow(run_id=rid, home=join(uri, rid), backend="?", state="Unknown", error=msg))
    promos = _promotions(uri, rows)
    if output == "json":
        typer.echo(json.dumps([r.to_json() for r in rows], indent=1, default=str))
        return
    if not rows:
        _console().print(f"no runs in {uri}")
        return
    from rich.markup import escape
    from rich.table import Table

    from gptoss_cloud.promotion import describe

    t = Table(title=f"runs in {uri}", title_justify="left", box=None, pad_edge=False)
    cols = ("RUN", "BACKEND", "STATE", "MODEL", "PROGRESS") + (("PROMOTION",) if promos else ())
    for col in cols:
        t.add_column(col, no_wrap=col not in ("PROGRESS", "PROMOTION"))
    for r in rows:
        note = format_progress(r.progress) if r.progress or not r.error else r.error.splitlines()[0]
        cells = (r.run_id, r.backend, r.state, f"{r.model} {r.method}".strip(), note) + ((describe(r.promotion),) if promos else ())
        # Cells are plain text: a name or message from the store must not be read as rich markup.
        t.add_row(*(escape(c) for c in cells))
    _console().print(t)


def _promotions(uri: str, rows: list) -> bool:
    """Attach each run's latest promotion decision (promoted/ in the store); warn about unreadable records."""
    from gptoss_cloud.promotion import promotion_by_run

    try:
        by_run, bad = promotion_by_run(uri)
    except GptossError as e:   # a broken promoted/ folder must not hide the runs themselves
        by_run, bad = {}, [e.message]
    for line in bad:
        _console(stderr=True).print(f"warning: {line}", markup=False)
    for r in rows:
        r.promotion = by_run.get(r.run_id)
    return bool(by_run)
