"""`init` (a commented starter spec) and `spec` (show / validate the resolved spec)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.commands.common import SpecArg, resolve


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    spec_app = typer.Typer(help="Show or validate a run spec.", no_args_is_help=True)
    spec_app.command("show")(show)
    spec_app.command("validate")(validate)
    app.add_typer(spec_app, name="spec")


def init(
    path: Annotated[Path, typer.Argument(help="where to write the starter spec")] = Path("gptoss.yaml"),
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing file")] = False,
) -> None:
    """Write a commented starter run spec."""
    from gptoss_cloud.starter import STARTER_SPEC

    if path.exists() and not force:
        raise GptossError(f"{path} exists", hint="pass --force to overwrite, or choose another path")
    path.write_text(STARTER_SPEC)
    typer.echo(f"wrote {path}; edit it, then: gptoss-cloud plan {path} && gptoss-cloud submit {path}")


def show(spec: SpecArg = None) -> None:
    """Print the fully resolved spec (defaults, user config, file, environment and flags applied)."""
    typer.echo(resolve(spec).to_yaml(), nl=False)


def validate(spec: SpecArg = None) -> None:
    """Validate a spec; exit 1 with the offending fields named."""
    s = resolve(spec)
    typer.echo(f"ok: spec version {s.version}, model {s.model.name}, method {s.method.kind}, backend {s.cluster.backend}")
