"""`promote RUN [--force]` and `tick SPEC`: gated promotion (docs/gitops-promotion.md)."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from gptoss_cloud.commands.common import SpecArg, StoreOpt, resolve


def register(app: typer.Typer) -> None:
    app.command("promote")(promote)
    app.command("tick")(tick)


def _print(decision, output: str) -> None:
    rec = decision.record
    if output == "json":
        typer.echo(json.dumps({**rec.to_json(), "history": decision.key, "store": decision.store}))
        return
    typer.echo(f"{rec.run_id}: {rec.decision.upper()} as {rec.name}" + (" (forced)" if rec.forced else ""))
    typer.echo(f"  why: {rec.reason}")
    if rec.previous:
        typer.echo(f"  promoted before: {rec.previous}")
    typer.echo(f"  recorded: {decision.store}/{decision.key}")


def promote(
    run: Annotated[str, typer.Argument(help="run id (looked up in the store) or the full URI/path of a run home", show_default=False)],
    force: Annotated[bool, typer.Option("--force", help="promote even if the gate refuses (or there is no evaluation): a rollback")] = False,
    store: StoreOpt = None,
    output: Annotated[str, typer.Option("-o", "--output", help="text | json")] = "text",
) -> None:
    """Promote RUN under its spec's promote.name if its evaluation passes the gate; record the decision either way."""
    from gptoss_cloud.commands.run import _find_run
    from gptoss_cloud.promotion import promote_run

    run_id, home = _find_run(run, store, strict=True)
    decision = promote_run(run_id, home, force=force)
    _print(decision, output)
    if not decision.promoted:
        raise typer.Exit(3)   # a refusal is a recorded answer, not a failure of the command: its own code


def tick(
    spec: SpecArg = None,
    store: StoreOpt = None,
    backend: Annotated[Optional[str], typer.Option("--backend", help="k8s | truss | local; overrides the spec")] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=1, help="seconds to wait for the run to end")] = 7 * 86400,
    poll: Annotated[float, typer.Option("--poll", min=0.1, help="seconds between status checks")] = 30.0,
    output: Annotated[str, typer.Option("-o", "--output", help="text | json")] = "text",
) -> None:
    """One scheduled tick: submit SPEC (dataset templates from now, UTC), wait, evaluate on promote.eval_data, promote if better."""
    from gptoss_cloud.backends.base import SubmitOptions, get_backend
    from gptoss_cloud.promotion import tick as run_tick

    def launch(s, run_id: str, home: str):   # exactly `submit`'s path: Backend.submit plans, records spec.yaml, starts
        return get_backend(s.cluster.backend).submit(s, run_id, home, SubmitOptions(), say=lambda n: typer.echo(n, err=True))

    decision = run_tick(resolve(spec, output__store=store, cluster__backend=backend), launch=launch, timeout_s=timeout, poll_s=poll,
                        log=lambda line: typer.echo(line, err=True))
    _print(decision, output)
